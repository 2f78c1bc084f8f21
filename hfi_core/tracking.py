"""MLflow: a parent run per pipeline run, a child run per stage, the model registry and its gates.

This is the only module that talks to MLflow. Runs are created through ``MlflowClient`` with an
explicit ``mlflow.parentRunId`` tag, because steps run in separate processes (containers, pods)
and ``mlflow.start_run(parent_run_id=...)`` only works while the parent is active in the same
process. A retried step finds its earlier child by tags and reuses it instead of adding a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from hfi_core.promotion import GateResult, Verdict

CHAMPION = "champion"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3 opens an experiment on its GenAI pages unless this tag says it trains models."""
SHARED_VIEW = "mlflow.sharedViewState."
"""MLflow's UI loads a runs-table view (columns, filter, order) from the experiment tag
``SHARED_VIEW + key`` when its URL carries ``?viewStateShareKey=key``: how its Share button works."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"distill.lr": "1e-05", ...}`` (MLflow params are flat strings, <= 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return {k: v[:6000] for k, v in out.items()}


class Tracker:
    """Parent/child runs in one experiment."""

    def __init__(
        self, tracking_uri: str, experiment: str, registry_uri: str | None = None, artifact_location: str | None = None
    ) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location, tags=EXPERIMENT_KIND
            )
        else:
            self.experiment_id = found.experiment_id
            if found.tags.get("mlflow.experimentKind") is None:
                self.client.set_experiment_tag(self.experiment_id, *next(iter(EXPERIMENT_KIND.items())))

    def _find(self, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=5)
        return runs[0].info.run_id if runs else None

    def parent(self, run_key: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The parent run of pipeline run ``run_key`` (created once, found again on retries)."""
        existing = self._find({"hfi.run_key": run_key, "hfi.level": "parent"})
        if existing:
            if self.client.get_run(existing).info.status != "RUNNING":  # a re-run or a retry after a failure
                self.client.set_terminated(existing, status=RunStatus.to_string(RunStatus.RUNNING))
            return existing
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={**tags, "hfi.run_key": run_key, "hfi.level": "parent"}
        )
        for k, v in flatten(params).items():
            self.client.log_param(run.info.run_id, k, v)
        return run.info.run_id

    def child(self, parent_id: str, stage: str, tags: dict[str, str]) -> str:
        """The stage's child run: a finished one is reused (a retry adds no second finished run)."""
        key = {"mlflow.parentRunId": parent_id, "hfi.stage": stage}
        existing = self._find(key)
        if existing:
            self.client.set_terminated(existing, status=RunStatus.to_string(RunStatus.RUNNING))
            for k, v in tags.items():
                self.client.set_tag(existing, k, v)
            return existing
        run = self.client.create_run(self.experiment_id, run_name=stage, tags={**tags, **key, "hfi.level": "child"})
        return run.info.run_id

    def nights_view(self, concept: str, metrics: list[str]) -> str:
        """Save the runs-table view that compares a concept's nights and return its URL fragment.

        The view lists the concept's parent runs (one row per night, newest first) with
        ``metrics`` as columns. MLflow's own default shows no metric column, and a column choice
        made by hand lives in one browser's storage; a shared view is on the server, for everyone.
        """
        key = "nights-" + "".join(c if c.isalnum() else "-" for c in concept.lower())
        quote = "'" if "'" not in concept else '"'  # MLflow's filter quotes strings either way
        view = {
            "searchFilter": f"tags.`hfi.level` = 'parent' and tags.`hfi.concept` = {quote}{concept}{quote}",
            "orderByKey": "attributes.start_time",
            "orderByAsc": False,
            "selectedColumns": [
                *(f"attributes.`{a}`" for a in ("Duration", "Source")),
                *(f"metrics.`{m}`" for m in metrics),
            ],  # fmt: skip
        }
        self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW + key, json.dumps(view))
        return f"#/experiments/{self.experiment_id}/runs?viewStateShareKey={key}"

    def log_metrics(self, run_id: str, metrics: dict[str, Any], prefix: str = "") -> None:
        """Numeric leaves of a nested dict as metrics (``groups.target:explicit.clip_concept_rate``)."""
        for k, v in flatten_numbers(metrics, prefix).items():
            self.client.log_metric(run_id, k, v)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    def settle(self, parent_id: str) -> None:
        """The parent ends FINISHED once none of its children is running or failed."""
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=200
        )
        states = {c.info.status for c in children}
        if "RUNNING" not in states:
            self.finish(parent_id, ok="FAILED" not in states)

    def log_image(self, run_id: str, path: Path, key: str) -> None:
        """An image under ``key`` (step 0): MLflow lines up the same key across runs."""
        from PIL import Image

        with Image.open(path) as im:
            self.client.log_image(run_id, im.convert("RGB"), key=key, step=0)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def champion(self, name: str, challenger_run: str) -> tuple[str, dict[str, float]] | None:
        """The champion's version and the numbers it was registered with, or ``None``.

        When the champion is ``challenger_run``'s own version (a retried register step), the one
        it was compared with is returned, so that the retry reaches the same verdict."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None  # no such model, or no alias yet
        prefix = "hfi."
        if version.run_id == challenger_run:
            if "hfi.champion.version" not in version.tags:
                return None
            prefix = "hfi.champion."
        numbers = {k: float(version.tags[f"{prefix}{k}"]) for k in ("concept_rate", "preservation_drop")
                   if f"{prefix}{k}" in version.tags}  # fmt: skip
        label = version.tags["hfi.champion.version"] if prefix == "hfi.champion." else version.version
        return (label, numbers) if len(numbers) == 2 else None

    def register(self, run_id: str, name: str, artifact_path: str, gates: GateResult, verdict: Verdict) -> str:
        """Register ``runs:/<run>/<artifact_path>`` as a version of ``name`` with its numbers and the
        verdict as tags; it takes the ``champion`` alias only when ``verdict.promoted``.

        A retried register step finds the version it made before (by run) instead of adding one.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # exists already
        run = self.client.get_run(run_id)
        mine = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = mine[0] if mine else self.client.create_model_version(
            name, f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id
        )  # fmt: skip
        tags = {"gates": json.dumps(gates.checks), "hfi.verdict": "promoted" if verdict.promoted else "kept champion",
                "hfi.reason": verdict.reason, **{f"hfi.{k}": v for k, v in verdict.night.items()}}  # fmt: skip
        if verdict.champion is not None:
            tags |= {f"hfi.champion.{k}": v for k, v in verdict.champion.items()}
            tags["hfi.champion.version"] = verdict.champion_version
        if not gates.passed:
            tags["failed_gate"] = ",".join(gates.failed)
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version.version, k, str(v))
        if verdict.promoted:
            self.client.set_registered_model_alias(name, CHAMPION, version.version)
        return version.version


def flatten_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}".replace(" ", "_")
        if isinstance(v, dict):
            out |= flatten_numbers(v, f"{key}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out
