"""The promotion gates: when a distilled model may become the registry's ``champion``.

Pure arithmetic on an evaluation summary, so that a run without MLflow still reports its verdict;
``tracking`` applies it to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class GateResult:
    """Which promotion gates passed (``checks``: gate -> {value, limit, passed})."""

    checks: dict[str, dict[str, Any]]

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [g for g, c in self.checks.items() if not c["passed"]]


def promotion_gates(
    summary: dict[str, dict[str, dict[str, float]]],
    max_concept_rate: float,
    max_preservation_drop: float,
    concept_metric: str = "clip_concept_rate",
    max_became: dict[str, float] | None = None,
) -> GateResult:
    """Gates on an evaluation summary (``stages.stage_evaluate``'s).

    - concept rate: mean over ``target`` groups of the distilled model's ``concept_metric`` (CLIP's
      concept rate, NudeNet's rate, or a toy-world oracle share) must be at most ``max_concept_rate``;
    - preservation: mean over ``preserve`` groups of CLIP score must drop by at most
      ``max_preservation_drop`` from the base model's;
    - ``became_<style>``, for each style of ``max_became``: mean over ``target`` groups of the share
      of images that turned into that style (``oracle_became_<style>``) must be at most its limit.

    Raises:
        ValueError: when a ``max_became`` style has no measurement in the summary.
    """

    def concept(groups: dict[str, dict[str, float]], metric: str = concept_metric) -> float:
        vals = [g[metric] for n, g in groups.items() if n.startswith("target")]
        return sum(vals) / len(vals)

    def preserve(groups: dict[str, dict[str, float]]) -> float:
        vals = [g["clip_score"] for n, g in groups.items() if n.startswith("preserve")]
        return sum(vals) / len(vals) if vals else 0.0

    rate = concept(summary["distilled"])
    drop = preserve(summary["sd"]) - preserve(summary["distilled"])
    checks: dict[str, dict[str, Any]] = {
        "concept_rate": {"value": rate, "limit": max_concept_rate, "passed": rate <= max_concept_rate},
        "preservation_drop": {"value": drop, "limit": max_preservation_drop, "passed": drop <= max_preservation_drop},
    }
    for style, limit in (max_became or {}).items():
        metric = f"oracle_became_{style}"
        targets = {n: g for n, g in summary["distilled"].items() if n.startswith("target")}
        if not all(metric in g for g in targets.values()):
            raise ValueError(
                f"promotion.max_became.{style}: the evaluation has no {metric!r} for every target group "
                "(it needs evaluate.oracle, an oracle style of that name, and the base model's images)"
            )
        share = concept(summary["distilled"], metric)
        checks[f"became_{style}"] = {"value": share, "limit": limit, "passed": share <= limit}
    return GateResult(checks)


@dataclass
class Verdict:
    """Whether tonight's model replaces the champion, and why (both models' numbers kept)."""

    promoted: bool
    reason: str
    night: dict[str, float]
    """Tonight's ``concept_rate`` and ``preservation_drop``."""
    champion: dict[str, float] | None
    """The champion's, when there is one."""
    champion_version: str | None = None


def challenge(gates: GateResult, champion: dict[str, float] | None, champion_version: str | None = None) -> Verdict:
    """The challenger rule: promote only a model that passes every gate **and** has a lower
    concept rate than the champion, with a preservation drop no larger than the champion's.
    A tie on the concept rate keeps the champion; so does a model that gains removal by losing
    preservation."""
    night = {k: float(gates.checks[k]["value"]) for k in ("concept_rate", "preservation_drop")}

    def verdict(promoted: bool, reason: str) -> Verdict:
        return Verdict(promoted, reason, night, champion, champion_version)

    if not gates.passed:
        return verdict(False, f"failed gate(s): {', '.join(gates.failed)}")
    if champion is None:
        return verdict(True, "passed the gates; there was no champion")
    c, d = champion["concept_rate"], champion["preservation_drop"]
    if night["concept_rate"] >= c:
        return verdict(False, f"concept rate {night['concept_rate']:.3f} does not beat the champion's {c:.3f}")
    if night["preservation_drop"] > d:
        return verdict(
            False, f"preservation drop {night['preservation_drop']:.3f} is worse than the champion's {d:.3f}"
        )
    return verdict(
        True, f"concept rate {night['concept_rate']:.3f} beats the champion's {c:.3f} with no more preservation lost"
    )
