"""Where the embedded models live: ``assets/<variant>/`` (shipped with the package), or ``$VTC_ASSETS``.

Only paths here (no heavy imports), so operators such as ``mqt`` can find their embedded weights.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["asset_dir", "model_dir", "VARIANTS"]

#: the embedded models, each a Hugging Face folder under the assets directory
VARIANTS: tuple[str, ...] = ("tiny-llava", "tiny-llava-next", "tiny-mqt")


def asset_dir() -> Path:
    """``$VTC_ASSETS`` if set, else the shipped ``assets/`` folder (installed or in the repository; :mod:`vtc.resources`)."""
    from vtc.resources import asset_dir as shipped

    return shipped()


def model_dir(variant: str) -> Path:
    """The folder of embedded model ``variant`` (it may not exist yet)."""
    return asset_dir() / variant
