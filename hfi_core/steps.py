"""One pipeline step as a transaction against the run store, recorded in MLflow.

``run_step(stage, ...)``:

1. hashes its inputs: the run config and the output hashes in its upstream stages' markers
   (an upstream stage without a marker has not finished: the step refuses to start);
2. if its own ``_SUCCESS`` marker lists the same input hashes, returns at once (a retry after
   success, or a re-run of an unchanged night, does nothing);
3. pulls the upstream folders into a scratch run folder, runs the stage function there;
4. records a child MLflow run (metrics, images, plots, the model card), pushes the outputs,
   and writes the marker *last*.

A step killed anywhere before 4 leaves no marker; its retry starts from a clean stage folder and,
every stage being seeded, produces the same outputs. The same function runs in-process, in a
container (``hfi step``) or in a pod.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hfi_core.config import RunConfig
from hfi_core.store import Store, tree_hashes

DEPENDS: dict[str, tuple[str, ...]] = {
    "generate": (),
    "publish": ("generate",),
    "feedback": ("generate",),
    "reward": ("generate", "feedback"),
    "invert": ("generate", "reward"),
    "distill": ("invert",),
    "evaluate": ("generate", "distill"),
    "register": ("evaluate", "distill"),
}
ARTIFACT_SUFFIXES = (".png", ".md", ".json", ".xml")


@dataclass
class TrackingContext:
    """Where to record a step and how to link it back to the orchestrator."""

    tracking_uri: str
    experiment: str
    run_key: str
    """Unique per pipeline run (e.g. ``<dag_id>/<run_id>``): finds the parent run again."""
    tags: dict[str, str] = field(default_factory=dict)
    """dag_id, run_id, task_id, try_number, image tag, git commit..."""
    artifact_location: str | None = None
    """Where a new experiment keeps artifacts (servers decide this themselves; sqlite stores need it)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()


def step_inputs(stage: str, cfg: RunConfig, store: Store, run_prefix: str) -> dict[str, str]:
    """The input hashes a marker must match: the config's and each upstream stage's outputs'."""
    inputs = {"config": config_hash(cfg)}
    for dep in DEPENDS[stage]:
        marker = store.success(_join(run_prefix, dep))
        if marker is None:
            raise RuntimeError(
                f"step {stage}: upstream stage {dep!r} has not finished ({store.uri(_join(run_prefix, dep))})"
            )
        inputs[dep] = hashlib.sha256(json.dumps(marker["outputs"], sort_keys=True).encode()).hexdigest()
    return inputs


def _call_stage(stage: str, cfg: RunConfig, run: Path) -> dict[str, Any]:
    from hfi_core import stages

    if stage == "register":
        return {}  # registration happens in run_step, where the MLflow run is
    fn = getattr(stages, f"stage_{stage}")
    kwargs = {"show_progress": False} if stage in ("generate", "invert", "distill") else {}
    return fn(cfg, run, **kwargs)


def run_step(
    stage: str,
    cfg: RunConfig,
    store: Store,
    run_prefix: str,
    scratch: Path,
    tracking: TrackingContext | None = None,
) -> dict[str, Any]:
    """Run ``stage`` of the run at ``store/run_prefix`` (see the module docstring)."""
    if stage not in DEPENDS:
        raise ValueError(f"unknown step {stage!r}; steps: {list(DEPENDS)}")
    prefix = _join(run_prefix, stage)
    inputs = step_inputs(stage, cfg, store, run_prefix)
    marker = store.success(prefix)
    if marker is not None and marker["inputs"] == inputs:
        return {"skipped": True, "reason": "a _SUCCESS marker with the same input hashes exists", "stage": stage}

    scratch = Path(scratch)
    for dep in DEPENDS[stage]:
        if not (scratch / dep).exists():
            store.download_dir(_join(run_prefix, dep), scratch / dep)
    shutil.rmtree(scratch / stage, ignore_errors=True)  # a retry starts clean
    result = _call_stage(stage, cfg, scratch)
    (scratch / stage).mkdir(parents=True, exist_ok=True)

    child = None
    if tracking is not None:
        from hfi_core.tracking import Tracker, promotion_gates

        tracker = Tracker(tracking.tracking_uri, tracking.experiment, artifact_location=tracking.artifact_location)
        parent = tracker.parent(tracking.run_key, f"{cfg.name} {tracking.run_key}", asdict(cfg), tracking.tags)
        child = tracker.child(parent, stage, {**tracking.tags, "hfi.store": store.uri(prefix)})
        tracker.log_metrics(child, result)
        for f in sorted((scratch / stage).rglob("*")):
            if f.suffix in ARTIFACT_SUFFIXES and f.stat().st_size < 5 * 2**20 and f.parent.name != "raw":
                tracker.client.log_artifact(
                    child, str(f), f"{stage}/{f.parent.relative_to(scratch / stage)}".rstrip("/.")
                )
        if stage == "register":
            summary = json.loads((scratch / "evaluate" / "summary.json").read_text())
            p = cfg.promotion
            gates = promotion_gates(summary, p.max_concept_rate, p.max_preservation_drop, p.concept_metric)
            tracker.log_artifacts(child, scratch / "distill", "model")
            version = tracker.register(child, p.model_name or f"hfi-{cfg.concept.name}", "model", gates)
            result = {"version": version, "champion": gates.passed, "gates": gates.checks}
            (scratch / stage / "registration.json").write_text(json.dumps(result, indent=2))
        tracker.finish(child)

    store.upload_dir(scratch / stage, prefix)
    store.mark_success(prefix, inputs, tree_hashes(scratch / stage), mlflow_run_id=child)
    return result
