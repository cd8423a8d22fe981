"""The embedded default models: tiny LLaVA, LLaVA-NeXT and MQT models that vtc trains and ships in assets/.

Data (procedural shapes VQA in two scene sizes, easy-VQA), the word-level vocabulary, Hugging Face
model definitions, compression-robust training (``python -m vtc.models.tiny train``), evaluation
and loading of the trained folders. Everything heavy (transformers, PIL) is imported by the
submodules that need it, not here.
"""

from vtc.models.tiny.assets import VARIANTS, asset_dir, model_dir

__all__ = ["VARIANTS", "asset_dir", "model_dir"]
