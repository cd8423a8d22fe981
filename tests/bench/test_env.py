"""vtc.bench.env: what every row records about where it ran."""

import torch

from vtc.bench.env import environment
from vtc.models.random import random_llava


def test_environment_names_the_model_attention_and_vtc_backend():
    model, _ = random_llava()
    env = environment(model, "cpu", torch.float32)
    assert env["device"] and env["dtype"] == "float32"
    assert env["attention"] == "sdpa[cpu]"  # the model's own attention implementation
    assert env["vtc_attention"] == "sdpa"  # xformers has no CPU kernels
    assert env["torch"] == torch.__version__ and "transformers" in env
    model.config.text_config._attn_implementation = "eager"
    assert environment(model, "cpu")["attention"] == "eager"
