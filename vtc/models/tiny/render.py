"""Drawing a :class:`~vtc.models.tiny.scene.Scene`: the RGB image and a label map of object ids.

Shapes are drawn without anti-aliasing with PIL, so pixels are exact and the same everywhere:
a circle (the disc inscribed in the object's box), a square (the box), an upward triangle (apex at
the top centre, base on the bottom edge) and a cross (two bars of width ``2*(r//3)+1``). The label
map holds ``i + 1`` where object ``i`` was drawn and 0 on the background; training uses it for
per-patch targets and the tests use it to check the image against the spec.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vtc.models.tiny.scene import BACKGROUND, Scene, SceneObject

__all__ = ["render", "render_labels", "draw_object"]


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill) -> None:
    """Draw one object's shape with ``fill`` (an RGB tuple or a label value)."""
    x, y, r = obj.x, obj.y, obj.r
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y0), (x0, y1), (x1, y1)], fill=fill)
    elif obj.shape == "cross":
        t = r // 3
        draw.rectangle((x0, y - t, x1, y + t), fill=fill)
        draw.rectangle((x - t, y0, x + t, y1), fill=fill)
    else:  # pragma: no cover - the generator only makes known shapes
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB ``PIL.Image`` of ``scene.width x scene.height`` pixels."""
    img = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, obj.rgb)
    return img


def render_labels(scene: Scene) -> np.ndarray:
    """``[height, width]`` uint8: ``i + 1`` on the pixels of object ``i``, 0 on the background."""
    if len(scene.objects) > 254:  # pragma: no cover - far beyond any config
        raise ValueError("a label map holds at most 254 objects")
    lab = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(lab)
    for i, obj in enumerate(scene.objects):
        draw_object(draw, obj, i + 1)
    return np.asarray(lab, dtype=np.uint8)
