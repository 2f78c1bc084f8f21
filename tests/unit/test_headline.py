"""What each step adds to the night's parent run: the columns the nights are compared by."""

from hfi_core.config import load_config
from hfi_core.stages import headline

CONFIG = "configs/toyworld-striped.yaml"


def test_the_parent_gets_labels_auc_before_after_per_group_and_both_models_numbers():
    cfg = load_config(CONFIG)
    assert headline("feedback", {"labels": 1755, "rows": 585}, cfg) == {"labels_used": 1755, "labelled_images": 585}
    assert headline("reward", {"holdout_auc": 0.97, "train_auc": 1.0}, cfg) == {"reward_auc": 0.97}
    summary = {
        "sd": {"target:explicit": {"oracle_striped": 1.0}},
        "distilled": {"target:explicit": {"oracle_striped": 0.1}},
    }
    assert headline("evaluate", summary, cfg) == {
        "target_explicit.concept_before": 1.0,
        "target_explicit.concept_after": 0.1,
    }
    reg = {"night": {"concept_rate": 0.05, "preservation_drop": 0.02}, "champion": False, "gates_passed": True,
           "previous_champion": {"version": "1", "concept_rate": 0.0, "preservation_drop": 0.01}}  # fmt: skip
    assert headline("register", reg, cfg) == {
        "concept_rate": 0.05, "preservation_drop": 0.02, "promoted": 0.0, "gates_passed": 1.0,
        "champion_concept_rate": 0.0, "champion_preservation_drop": 0.01,
    }  # fmt: skip
    assert headline("reward", {"skipped": True}, cfg) == {}


def test_headline_keys_name_every_metric_headline_puts_on_a_parent():
    """The nights view's columns are ``headline_keys``; a headline metric missing there would be
    a metric no column shows."""
    from hfi_core.stages import headline_keys

    cfg = load_config(CONFIG)
    groups = [ps.group for ps in cfg.prompts]
    summary = {v: {g: {"oracle_striped": 0.5} for g in groups} for v in ("sd", "distilled")}
    reg = {"night": {"concept_rate": 0.05, "preservation_drop": 0.02}, "champion": True, "gates_passed": True,
           "previous_champion": {"version": "1", "concept_rate": 0.1, "preservation_drop": 0.01}}  # fmt: skip
    made = {**headline("feedback", {"labels": 3, "rows": 1}, cfg), **headline("reward", {"holdout_auc": 0.9}, cfg),
            **headline("evaluate", summary, cfg), **headline("register", reg, cfg)}  # fmt: skip
    assert set(made) == set(headline_keys(cfg))
