import numpy as np
import pytest

from hfi_core.toyworld.render import (
    BACKGROUND,
    COLORS,
    SHAPES,
    STYLE_PHRASES,
    STYLES,
    Scene,
    caption,
    render,
    sample_scenes,
    style_of_phrase,
)


def _scene(**kw):
    base = dict(shape="square", color="red", style="plain", cx=16.0, cy=16.0, radius=10.0)
    return Scene(**{**base, **kw})


def test_same_scene_renders_the_same_bytes():
    s = sample_scenes(5, seed=3)
    assert [render(x).tobytes() for x in s] == [render(x).tobytes() for x in sample_scenes(5, seed=3)]
    assert render(s[0]).shape == (32, 32, 3) and render(s[0]).dtype == np.uint8


def test_styles_differ_in_their_white_marks_inside_the_shape():
    # A square covers rows/cols 7.5..24.5; its interior 9..23 holds full stripes and dots.
    interior = (slice(9, 24), slice(9, 24))
    white = {st: (render(_scene(style=st))[interior].min(axis=-1) > 200) for st in STYLES}
    assert white["plain"].sum() == 0
    rows_all_white = white["striped"].all(axis=1)
    assert 5 <= rows_all_white.sum() <= 9  # three 3-px stripes at pitch 6 cross 15 rows
    assert not white["dotted"].all(axis=1).any()  # dots never fill a row
    assert 0.05 < white["dotted"].mean() < 0.2 < white["striped"].mean()


def test_shapes_and_colours_are_drawn_where_and_as_asked():
    imgs = {sh: render(_scene(shape=sh)) for sh in SHAPES}
    fg = {sh: (np.abs(img.astype(float) - BACKGROUND).sum(-1) > 60) for sh, img in imgs.items()}
    assert fg["square"].sum() > fg["circle"].sum() * 0.8  # similar areas, so size gives nothing away
    assert fg["triangle"][8, 16] and not fg["triangle"][8, 9]  # narrow apex at the top
    assert fg["triangle"][23, 9]  # wide base
    for color, rgb in COLORS.items():
        centre = render(_scene(color=color))[16, 16].astype(int)
        assert np.argmax(centre) == np.argmax(rgb), color


def test_sample_scenes_covers_every_combination_evenly():
    scenes = sample_scenes(27 * 4, seed=0)
    counts = {}
    for s in scenes:
        counts[(s.shape, s.color, s.style)] = counts.get((s.shape, s.color, s.style), 0) + 1
    assert len(counts) == 27 and set(counts.values()) == {4}


def test_scene_rejects_an_unknown_attribute_and_names_the_field():
    with pytest.raises(ValueError, match=r"Scene\.style: 'wavy'"):
        _scene(style="wavy")


def test_implicit_phrasings_never_say_stripe_and_map_back_to_striped():
    explicit, *implicit = STYLE_PHRASES["striped"]
    assert "stripe" in explicit and len(implicit) >= 2
    assert all("stripe" not in p for p in implicit)
    assert all(style_of_phrase(p) == "striped" for p in STYLE_PHRASES["striped"])
    assert caption("red", "circle", implicit[0]) == "a red circle with a zebra pattern"
