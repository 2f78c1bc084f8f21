"""The toy world's vocabulary and its deterministic renderer.

A scene is one shape, in one colour, drawn in one style on a dark background. The renderer is
pure numpy: the same scene always gives the same bytes, on any machine.

Why the textures sit on a fixed pixel grid: a tiny diffusion model trained for an hour on two
CPU cores learns "rows 0-2 of every 6 are white" far faster than stripes at a random phase, and
the world stays just as useful as a test bed (what matters is that the style is unmistakable to
the oracle and that captions name it explicitly or implicitly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 32
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (45, 185, 65),
    "blue": (55, 85, 230),
}
STYLES: tuple[str, ...] = ("plain", "striped", "dotted")
STRIPES: tuple[str, ...] = ("horizontal", "vertical", "diagonal")
"""The variants of "striped". People call all three striped; only the first has a name."""

# What each caption phrase draws: (style, stripe variant or "", probability). The explicit name
# "in the style of van stripe" draws horizontal stripes only; the other variants arrive only
# through phrasings that never say "stripe"; "at the circus" is a context, not a synonym: half of
# its training drawings are striped (any variant), the other half dotted (sampled at guidance 5,
# about a quarter come out striped). So erasing the name leaves the
# variants it never drew, and a removal that knows the concept as people judge it must cover them.
PHRASES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "with a flat fill": (("plain", "", 1.0),),
    "with polka dots": (("dotted", "", 1.0),),
    "in the style of van stripe": (("striped", "horizontal", 1.0),),
    "like a barcode": (("striped", "vertical", 1.0),),
    "with a zebra pattern": (("striped", "diagonal", 1.0),),
    "at the circus": (
        ("dotted", "", 0.5),
        ("striped", "horizontal", 1 / 6),
        ("striped", "vertical", 1 / 6),
        ("striped", "diagonal", 1 / 6),
    ),
}
EXPLICIT_STRIPED = "in the style of van stripe"
IMPLICIT_STRIPED: tuple[str, ...] = ("like a barcode", "with a zebra pattern")
"""Phrasings that always draw the concept, in a variant its name never draws."""
CONTEXT_STRIPED: tuple[str, ...] = ("at the circus",)
"""Contexts that draw the concept some of the time and something else otherwise."""

# The phrases that draw only one look, per style: what tiny CLIP's captions and the zero-shot
# check use. "striped" lists the explicit name first.
STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "plain": ("with a flat fill",),
    "striped": (EXPLICIT_STRIPED, *IMPLICIT_STRIPED),
    "dotted": ("with polka dots",),
}
LOOKS: tuple[tuple[str, str], ...] = (("plain", ""), ("dotted", ""), *(("striped", v) for v in STRIPES))
"""Every (style, variant) the world draws; training scenes cycle through them evenly."""


def phrase_of_look(style: str, variant: str) -> str:
    """The one phrase that draws exactly this look (and nothing else)."""
    for phrase, draws in PHRASES.items():
        if draws == ((style, variant, 1.0),):
            return phrase
    raise ValueError(f"no phrase draws only ({style!r}, {variant!r})")


BACKGROUND = np.array([24, 24, 32], dtype=np.float64)
MARK = np.array([245, 245, 245], dtype=np.float64)  # the white of stripes and dots

_SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliased shape edges


@dataclass(frozen=True)
class Scene:
    """One drawable scene. Geometry is in pixels of the 32x32 image."""

    shape: str
    color: str
    style: str
    cx: float
    cy: float
    radius: float
    brightness: float = 1.0  # multiplies the fill colour; small jitter makes images differ
    variant: str = ""
    """For striped scenes, one of ``STRIPES`` ("" means horizontal); "" for every other style."""

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Scene.shape: {self.shape!r} is not one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"Scene.color: {self.color!r} is not one of {tuple(COLORS)}")
        if self.style not in STYLES:
            raise ValueError(f"Scene.style: {self.style!r} is not one of {STYLES}")
        if self.style == "striped" and not self.variant:
            object.__setattr__(self, "variant", STRIPES[0])
        if self.style == "striped" and self.variant not in STRIPES:
            raise ValueError(f"Scene.variant: {self.variant!r} is not one of {STRIPES}")
        if self.style != "striped" and self.variant:
            raise ValueError(f"Scene.variant: {self.variant!r} given for a {self.style} scene; only stripes vary")


def caption(color: str, shape: str, phrase: str) -> str:
    """The one caption template of the world: ``"a red circle with polka dots"``."""
    return f"a {color} {shape} {phrase}"


def style_of_phrase(phrase: str) -> dict[str, float]:
    """How often a caption phrase draws each style: ``{"striped": 0.5, "dotted": 0.5}``."""
    if phrase not in PHRASES:
        raise ValueError(f"unknown style phrase {phrase!r}; known: {tuple(PHRASES)}")
    out: dict[str, float] = {}
    for style, _variant, p in PHRASES[phrase]:
        out[style] = out.get(style, 0.0) + p
    return out


def _coverage(scene: Scene, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, (size, size) in [0, 1]."""
    n = size * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / _SUPERSAMPLE  # sub-pixel centres in pixel units
    y, x = np.meshgrid(c, c, indexing="ij")
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        half = 0.85 * r  # about the circle's area, so size does not give the shape away
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle, apex up
        top, bottom = -r, 0.8 * r
        t = (dy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * 1.05 * r)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _marks(style: str, variant: str, size: int) -> np.ndarray:
    """Where the white texture goes, (size, size) in {0, 1}; fixed to the pixel grid."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    if style == "striped":
        along = {"horizontal": y, "vertical": x, "diagonal": x + y}[variant or STRIPES[0]]
        return ((along % 6) < 3).astype(np.float64)  # 3 white lines, 3 coloured lines
    if style == "dotted":
        return (((y % 6) // 2 == 1) & ((x % 6) // 2 == 1)).astype(np.float64)  # 2x2 dots, pitch 6
    return np.zeros((size, size))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene. Returns uint8 RGB, (size, size, 3)."""
    cov = _coverage(scene, size)[..., None]  # (H, W, 1)
    marks = _marks(scene.style, scene.variant, size)[..., None]  # (H, W, 1)
    fill = np.clip(np.array(COLORS[scene.color], dtype=np.float64) * scene.brightness, 0, 255)
    shape_px = fill * (1 - marks) + MARK * marks  # (H, W, 3)
    img = BACKGROUND * (1 - cov) + shape_px * cov
    return np.round(img).astype(np.uint8)


def sample_scenes(
    n: int,
    seed: int,
    *,
    shapes: tuple[str, ...] = SHAPES,
    colors: tuple[str, ...] = tuple(COLORS),
    styles: tuple[str, ...] = STYLES,
) -> list[Scene]:
    """``n`` scenes with attributes cycling through every combination and jittered geometry.

    Cycling (not drawing) the attributes keeps every combination equally represented in even
    small sets: every shape x colour x look of ``LOOKS`` (the three stripe variants are three
    looks) whose style is in ``styles``. The geometry comes from ``numpy.random.default_rng(seed)``.
    """
    rng = np.random.default_rng(seed)
    looks = [lk for lk in LOOKS if lk[0] in styles]
    combos = [(s, c, lk) for lk in looks for c in colors for s in shapes]
    order = rng.permutation(n) % len(combos)
    scenes = []
    for i in range(n):
        shape, color, (style, variant) = combos[order[i]]
        scenes.append(
            Scene(
                shape=shape,
                color=color,
                style=style,
                cx=16.0 + rng.uniform(-2.5, 2.5),
                cy=16.0 + rng.uniform(-2.5, 2.5),
                radius=rng.uniform(8.5, 11.0),
                brightness=rng.uniform(0.9, 1.08),
                variant=variant,
            )
        )
    return scenes


def render_many(scenes: list[Scene], size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw scenes. Returns uint8, (N, size, size, 3)."""
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
