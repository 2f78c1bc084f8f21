"""MLflow tracking on a real (sqlite) store: parent/child runs, retries, registry gates."""

import pytest
from mlflow.tracking import MlflowClient

from hfi_core.promotion import challenge, promotion_gates
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


def _night(concept_after: float, preserve_after: float) -> dict:
    """An evaluation summary whose distilled model has these concept rate and preserve CLIP score."""
    return {
        "sd": SUMMARY["sd"],
        "distilled": {
            "target:explicit": {"clip_concept_rate": concept_after, "clip_score": 0.25},
            "preserve": {"clip_concept_rate": 0.1, "clip_score": preserve_after},
        },
    }


def _register(tracker, tmp_path, key, summary, limit=0.1):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "README.md").write_text("card")
    run = tracker.child(tracker.parent(key, key, {}, {}), "register", {})
    tracker.log_artifacts(run, tmp_path / "model", "model")
    gates = promotion_gates(summary, limit, 0.05)
    champion = tracker.champion("hfi-toy", run)
    verdict = challenge(gates, champion[1] if champion else None, champion[0] if champion else None)
    return run, tracker.register(run, "hfi-toy", "model", gates, verdict), verdict


def test_the_champion_moves_only_to_a_night_that_passes_the_gates_and_beats_it(tracker, tmp_path):
    client: MlflowClient = tracker.client
    _, v1, first = _register(tracker, tmp_path, "night1", _night(0.05, 0.29))
    assert first.promoted and client.get_model_version_by_alias("hfi-toy", CHAMPION).version == v1
    _, v2, tie = _register(tracker, tmp_path, "night2", _night(0.05, 0.30))  # same concept rate: a tie
    assert not tie.promoted and "does not beat" in tie.reason
    _, v3, worse = _register(tracker, tmp_path, "night3", _night(0.02, 0.26))  # less concept, less preserved
    assert not worse.promoted and "preservation" in worse.reason
    _, v4, failed = _register(tracker, tmp_path, "night4", _night(0.02, 0.30), limit=0.01)
    assert not failed.promoted and client.get_model_version("hfi-toy", v4).tags["failed_gate"] == "concept_rate"
    assert client.get_model_version_by_alias("hfi-toy", CHAMPION).version == v1
    run5, v5, better = _register(tracker, tmp_path, "night5", _night(0.02, 0.30))
    assert better.promoted and client.get_model_version_by_alias("hfi-toy", CHAMPION).version == v5
    tags = client.get_model_version("hfi-toy", v5).tags
    assert tags["hfi.verdict"] == "promoted" and tags["hfi.champion.version"] == str(v1)
    assert float(tags["hfi.champion.concept_rate"]) == pytest.approx(0.05) and float(tags["hfi.concept_rate"]) == 0.02
    assert client.get_model_version("hfi-toy", v2).tags["hfi.verdict"] == "kept champion"
    # A retried register step finds its own version and reaches the same verdict against v1.
    champion = tracker.champion("hfi-toy", run5)
    assert champion is not None and str(champion[0]) == str(v1)
    gates = promotion_gates(_night(0.02, 0.30), 0.1, 0.05)
    assert tracker.register(run5, "hfi-toy", "model", gates, challenge(gates, champion[1], champion[0])) == v5
    assert len(client.search_model_versions("name = 'hfi-toy'")) == 5


def test_the_experiment_opens_on_its_runs_not_on_the_genai_pages(tracker):
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_the_nights_view_lists_one_concepts_parents_with_the_headline_columns(tracker):
    import json

    from hfi_core.config import load_config
    from hfi_core.stages import headline_keys

    keys = headline_keys(load_config("configs/toyworld-striped.yaml"))
    link = tracker.nights_view("van gogh's", keys)
    assert link == f"#/experiments/{tracker.experiment_id}/runs?viewStateShareKey=nights-van-gogh-s"
    tags = tracker.client.get_experiment(tracker.experiment_id).tags
    view = json.loads(tags["mlflow.sharedViewState.nights-van-gogh-s"])
    assert [c for c in view["selectedColumns"] if c.startswith("metrics.")] == [f"metrics.`{k}`" for k in keys]
    assert "target_implicit_zebra.concept_after" in keys and "labels_used" in keys
    # The view's filter is one MLflow's server accepts, and it selects that concept's nights only.
    wanted = tracker.parent("dag:a", "van gogh's · a", {}, {"hfi.concept": "van gogh's"})
    tracker.child(wanted, "generate", {"hfi.concept": "van gogh's"})
    tracker.parent("dag:b", "striped · b", {}, {"hfi.concept": "striped"})
    found = tracker.client.search_runs([tracker.experiment_id], view["searchFilter"])
    assert [r.info.run_id for r in found] == [wanted]


def test_a_parent_finishes_when_no_child_is_running_and_fails_with_a_child(tracker):
    parent = tracker.parent("dag:run3", "striped · night", {}, {})
    a, b = tracker.child(parent, "generate", {}), tracker.child(parent, "publish", {})
    tracker.finish(a)
    tracker.settle(parent)
    assert tracker.client.get_run(parent).info.status == "RUNNING"  # publish still runs
    tracker.finish(b, ok=False)
    tracker.settle(parent)
    assert tracker.client.get_run(parent).info.status == "FAILED"
    tracker.finish(tracker.child(parent, "publish", {}))  # the retry reuses the child and succeeds
    tracker.parent("dag:run3", "striped · night", {}, {})
    tracker.settle(parent)
    assert tracker.client.get_run(parent).info.status == "FINISHED"


def test_flatten_turns_nested_config_into_flat_string_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
