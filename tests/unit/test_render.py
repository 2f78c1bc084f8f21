import numpy as np
import pytest

from hfi_core.toyworld.render import (
    BACKGROUND,
    COLORS,
    CONTEXT_STRIPED,
    EXPLICIT_STRIPED,
    IMPLICIT_STRIPED,
    LOOKS,
    PHRASES,
    SHAPES,
    STRIPES,
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


def test_the_three_stripe_variants_run_along_rows_columns_and_diagonals():
    interior = (slice(9, 24), slice(9, 24))
    white = {v: render(_scene(style="striped", variant=v))[interior].min(axis=-1) > 200 for v in STRIPES}
    assert 5 <= white["horizontal"].all(axis=1).sum() <= 9 and not white["horizontal"].all(axis=0).any()
    assert 5 <= white["vertical"].all(axis=0).sum() <= 9 and not white["vertical"].all(axis=1).any()
    diag = white["diagonal"]
    assert not diag.all(axis=0).any() and not diag.all(axis=1).any()
    assert all(diag[i, j] == diag[i + 1, j - 1] for i in range(14) for j in range(1, 15))  # constant along x + y
    assert 0.4 < diag.mean() < 0.6 and _scene(style="striped").variant == "horizontal"  # the default


def test_sample_scenes_covers_every_combination_evenly():
    scenes = sample_scenes(45 * 4, seed=0)
    counts = {}
    for s in scenes:
        key = (s.shape, s.color, s.style, s.variant)
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 45 and set(counts.values()) == {4}  # 3 shapes x 3 colours x 5 looks
    assert {(s.style, s.variant) for s in scenes} == set(LOOKS)


def test_scene_rejects_an_unknown_attribute_and_names_the_field():
    with pytest.raises(ValueError, match=r"Scene\.style: 'wavy'"):
        _scene(style="wavy")
    with pytest.raises(ValueError, match=r"Scene\.variant: 'zigzag'"):
        _scene(style="striped", variant="zigzag")
    with pytest.raises(ValueError, match=r"Scene\.variant: 'vertical' given for a dotted scene"):
        _scene(style="dotted", variant="vertical")


def test_the_name_draws_one_variant_and_only_phrasings_without_it_draw_the_others():
    assert "stripe" in EXPLICIT_STRIPED and PHRASES[EXPLICIT_STRIPED] == (("striped", "horizontal", 1.0),)
    others = {v for p in IMPLICIT_STRIPED for s, v, _ in PHRASES[p]}
    assert others == set(STRIPES) - {"horizontal"}  # every variant the name never draws
    assert all("stripe" not in p for p in (*IMPLICIT_STRIPED, *CONTEXT_STRIPED))
    assert all(style_of_phrase(p) == {"striped": 1.0} for p in (EXPLICIT_STRIPED, *IMPLICIT_STRIPED))
    # A context, not a synonym: the concept some of the time, a protected neighbour otherwise.
    assert style_of_phrase(CONTEXT_STRIPED[0]) == pytest.approx({"striped": 0.5, "dotted": 0.5})
    assert all(sum(w for *_, w in draws) == pytest.approx(1.0) for draws in PHRASES.values())
    assert caption("red", "circle", IMPLICIT_STRIPED[0]) == "a red circle like a barcode"
