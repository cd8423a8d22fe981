"""Procedural scenes: coloured shapes of two sizes on a canvas, as a spec deterministic from a seed.

A :class:`Scene` is the ground truth the questions are asked about and the renderer draws: a
canvas size and a list of non-overlapping :class:`SceneObject` (shape, colour, size class, centre,
radius). :func:`generate_scene` draws one from a seed (``random.Random(seed)``: the same seed gives
the same scene on every machine and Python version). :data:`SMALL_SCENES` are the 96x96 scenes of
``tiny-llava`` (1-8 objects, small ones about two 4-pixel patches wide); :data:`LARGE_SCENES` are
the larger canvases of ``tiny-llava-next`` (128x128, 64x128, 128x64; up to 12 objects), whose small
objects shrink below one patch in AnyRes's downscaled base view, so answers about them need the crops.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["COLORS", "SHAPES", "SIZES", "SceneObject", "Scene", "SceneConfig", "generate_scene",
           "SMALL_SCENES", "LARGE_SCENES", "BACKGROUND"]

#: colour name -> RGB (objects jitter each channel by up to ``SceneConfig.jitter``)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 95, 235),
    "yellow": (240, 225, 40),
    "purple": (160, 60, 210),
    "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUND: tuple[int, int, int] = (40, 40, 40)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its class (``shape``, ``color``, ``size``), centre ``(x, y)`` and radius in pixels.

    The shape fills the square ``[x - r, x + r] x [y - r, y + r]`` (inclusive pixel bounds).
    """

    shape: str
    color: str
    size: str
    x: int
    y: int
    r: int
    rgb: tuple[int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` inclusive pixel bounds."""
        return self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r


@dataclass(frozen=True)
class Scene:
    """A canvas ``height x width`` holding ``objects`` (no two boxes overlap or touch)."""

    height: int
    width: int
    objects: tuple[SceneObject, ...]
    seed: str | int = 0


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn.

    ``canvases``: ``((height, width), weight)`` choices; ``objects``: per canvas, the inclusive
    range of object counts; ``small_r`` / ``large_r``: inclusive radius ranges (pixels);
    ``small_share``: probability that an object is small; ``gap``: minimum free pixels between
    boxes and to the border; ``jitter``: maximum per-channel colour jitter.
    """

    canvases: tuple[tuple[tuple[int, int], float], ...] = (((96, 96), 1.0),)
    objects: tuple[tuple[int, int], ...] = ((1, 8),)
    small_r: tuple[int, int] = (3, 4)
    large_r: tuple[int, int] = (8, 11)
    small_share: float = 0.5
    gap: int = 2
    jitter: int = 20
    max_tries: int = 200


SMALL_SCENES = SceneConfig()
LARGE_SCENES = SceneConfig(
    canvases=(((128, 128), 0.6), ((64, 128), 0.2), ((128, 64), 0.2)),
    objects=((3, 12), (2, 7), (2, 7)),
    small_r=(2, 3),
    large_r=(6, 9),
    small_share=0.6,
)


def _fits(box: tuple[int, int, int, int], placed: list[SceneObject], gap: int) -> bool:
    x0, y0, x1, y1 = box
    for o in placed:
        a0, b0, a1, b1 = o.box
        if x0 <= a1 + gap and a0 <= x1 + gap and y0 <= b1 + gap and b0 <= y1 + gap:
            return False
    return True


def generate_scene(seed: str | int, config: SceneConfig = SMALL_SCENES) -> Scene:
    """The scene of ``seed`` under ``config`` (same seed and config: same scene, everywhere).

    Objects that find no free place after ``max_tries`` attempts are dropped, so a scene may hold
    fewer objects than drawn; the spec is always the truth.
    """
    rng = random.Random(seed)
    weights = [w for _, w in config.canvases]
    ci = rng.choices(range(len(config.canvases)), weights=weights)[0]
    (h, w), _ = config.canvases[ci]
    lo, hi = config.objects[ci] if len(config.objects) > ci else config.objects[-1]
    n = rng.randint(lo, hi)
    colors = list(COLORS)
    placed: list[SceneObject] = []
    for _ in range(n):
        size = "small" if rng.random() < config.small_share else "large"
        r = rng.randint(*(config.small_r if size == "small" else config.large_r))
        shape = rng.choice(SHAPES)
        color = rng.choice(colors)
        base = COLORS[color]
        rgb = tuple(min(255, max(0, c + rng.randint(-config.jitter, config.jitter))) for c in base)
        m = r + config.gap
        for _ in range(config.max_tries):
            if w - 1 - m < m or h - 1 - m < m:
                break
            x, y = rng.randint(m, w - 1 - m), rng.randint(m, h - 1 - m)
            obj = SceneObject(shape, color, size, x, y, r, rgb)  # type: ignore[arg-type]
            if _fits(obj.box, placed, config.gap):
                placed.append(obj)
                break
    return Scene(height=h, width=w, objects=tuple(placed), seed=seed)
