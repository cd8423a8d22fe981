"""Small sizes of the embedded variants, so the tiny-model tests run in seconds."""

import pytest

#: tiny-llava at 32 px (an 8x8 grid) with narrow layers
SMALL = dict(image_size=32, vision_hidden=16, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
             text_heads=2, text_kv_heads=2, text_intermediate=64)
#: tiny-llava-next keeps its 64-pixel views (the procedural canvases are multiples of them)
SMALL_NEXT = {**SMALL, "image_size": 64}


@pytest.fixture
def small():
    return dict(SMALL)


@pytest.fixture
def small_next():
    return dict(SMALL_NEXT)
