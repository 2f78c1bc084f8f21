"""MLflow tracking on a real (sqlite) store: parent/child runs, retries, registry gates."""

import pytest
from mlflow.tracking import MlflowClient

from hfi_core.promotion import promotion_gates
from hfi_core.tracking import CHAMPION, Tracker, flatten


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "hfi-test", artifact_location=(tmp_path / "artifacts").as_uri())


SUMMARY = {
    "sd": {
        "target:explicit": {"clip_concept_rate": 0.9, "clip_score": 0.30},
        "preserve": {"clip_concept_rate": 0.1, "clip_score": 0.31},
    },
    "distilled": {
        "target:explicit": {"clip_concept_rate": 0.05, "clip_score": 0.25},
        "preserve": {"clip_concept_rate": 0.1, "clip_score": 0.29},
    },
}


def test_gates_compare_the_distilled_concept_rate_and_the_preservation_drop():
    ok = promotion_gates(SUMMARY, max_concept_rate=0.1, max_preservation_drop=0.05)
    assert ok.passed and ok.checks["preservation_drop"]["value"] == pytest.approx(0.02)
    strict = promotion_gates(SUMMARY, max_concept_rate=0.01, max_preservation_drop=0.01)
    assert not strict.passed and strict.failed == ["concept_rate", "preservation_drop"]


def test_a_parent_and_its_children_are_found_again_on_retry(tracker):
    parent = tracker.parent("dag:run1", "night 1", {"distill": {"lr": 1e-5, "prompts": ["a", "b"]}}, {"dag_id": "d"})
    assert tracker.parent("dag:run1", "night 1", {}, {}) == parent
    child = tracker.child(parent, "reward", {"try_number": "1"})
    tracker.log_metrics(child, {"holdout_auc": 0.97, "note": "text is not a metric", "nested": {"n": 3}})
    tracker.finish(child)
    again = tracker.child(parent, "reward", {"try_number": "2"})
    assert again == child
    tracker.finish(again)
    client = tracker.client
    run = client.get_run(child)
    assert run.data.metrics == {"holdout_auc": 0.97, "nested.n": 3.0} and run.data.tags["try_number"] == "2"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert client.get_run(parent).data.params["distill.prompts"] == '["a", "b"]'
    children = client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 1


def test_a_version_gets_the_champion_alias_only_when_its_gates_pass(tracker, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("card")
    parent = tracker.parent("dag:run2", "night 2", {}, {})
    run = tracker.child(parent, "register", {})
    tracker.log_artifacts(run, tmp_path / "model", "model")
    good = tracker.register(run, "hfi-toy", "model", promotion_gates(SUMMARY, 0.1, 0.05))
    bad = tracker.register(run, "hfi-toy", "model", promotion_gates(SUMMARY, 0.01, 0.05))
    client: MlflowClient = tracker.client
    assert client.get_model_version_by_alias("hfi-toy", CHAMPION).version == good
    assert client.get_model_version("hfi-toy", bad).tags["failed_gate"] == "concept_rate"


def test_flatten_turns_nested_config_into_flat_string_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
