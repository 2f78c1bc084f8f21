"""Where an erased concept went: the paired "became" shares and the gate that refuses a removal
that turns the concept into a protected neighbour."""

import pytest

from hfi_core.config import ConfigError, PromotionConfig, parse
from hfi_core.evaluation import became
from hfi_core.promotion import promotion_gates


def _pred(styles, shapes=None, colors=None):
    n = len(styles)
    return {"style": styles, "shape": shapes or ["circle"] * n, "color": colors or ["red"] * n}


def test_became_counts_images_that_left_their_base_style_for_each_other_style():
    base = _pred(["striped"] * 4 + ["dotted"], shapes=["circle"] * 5)
    now = _pred(["plain", "dotted", "dotted", "striped", "dotted"], shapes=["circle"] * 4 + ["square"])
    out = became(base, now)
    assert out["became_dotted"] == pytest.approx(2 / 5)  # the dotted image that stayed dotted is not counted
    assert out["became_plain"] == pytest.approx(1 / 5)
    assert out["became_striped"] == 0
    assert out["shape_changed"] == pytest.approx(1 / 5) and out["color_changed"] == 0


def _summary(became_dotted):
    groups = lambda b: {  # noqa: E731
        "target:explicit": {"oracle_striped": 0.05, "clip_score": 0.3, "oracle_became_dotted": b},
        "target:implicit:barcode": {"oracle_striped": 0.05, "clip_score": 0.3, "oracle_became_dotted": b},
        "preserve:dotted": {"oracle_striped": 0.0, "clip_score": 0.3},
    }
    return {"sd": groups(0.0), "distilled": groups(became_dotted)}


def test_the_became_gate_refuses_a_removal_into_a_protected_neighbour():
    clean = promotion_gates(_summary(0.1), 0.1, 0.05, "oracle_striped", {"dotted": 0.2})
    assert clean.passed and clean.checks["became_dotted"]["value"] == pytest.approx(0.1)
    into_dots = promotion_gates(_summary(0.6), 0.1, 0.05, "oracle_striped", {"dotted": 0.2})
    assert into_dots.failed == ["became_dotted"]
    assert set(promotion_gates(_summary(0.6), 0.1, 0.05, "oracle_striped").checks) == {
        "concept_rate",
        "preservation_drop",
    }  # no limit configured, no gate
    with pytest.raises(ValueError, match="max_became.wavy.*oracle_became_wavy"):
        promotion_gates(_summary(0.1), 0.1, 0.05, "oracle_striped", {"wavy": 0.2})


def test_a_became_limit_outside_zero_one_is_refused_on_load():
    with pytest.raises(ConfigError, match="max_became"):
        parse(PromotionConfig, {"max_became": {"dotted": 1.5}}, "promotion")
