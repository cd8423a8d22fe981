"""vtc: visual-token compression for LLaVA-style vision-language models.

Public API: :class:`VisualTokens` and :class:`Layout` (the token contract), :func:`build`
(pipelines from strings, dicts, lists or YAML), :func:`register` and :func:`list_ops` (the
operator registry), :func:`create` (one operator by name) and :func:`apply` (attach a pipeline to
a Hugging Face LLaVA / LLaVA-NeXT / Qwen VL model). ``import vtc`` needs only torch.
"""

from vtc.errors import VtcError
from vtc.pipeline import Pipeline, build
from vtc.registry import create, list_ops, register
from vtc.tokens import Layout, VisualTokens

__version__ = "0.1.0"

__all__ = ["VisualTokens", "Layout", "Pipeline", "build", "create", "register", "list_ops", "apply",
           "VtcError", "__version__"]


def apply(model, pipeline, **options):
    """Attach ``pipeline`` to a stock Hugging Face LLaVA / LLaVA-NeXT / Qwen VL ``model``; returns a Handle.

    See :func:`vtc.integrations.apply`.
    """
    from vtc.integrations import apply as _apply

    return _apply(model, pipeline, **options)
