"""Shared fixtures of the bench tests: a tiny JSONL task with generated images, and tiny configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_jsonl_task(root: Path, n: int = 6, *, broken_image: bool = True, malformed: bool = True,
                     metric: str = "vqa") -> Path:
    """A JSONL task in ``root``: n questions about solid-colour images, plus optional bad records.

    Returns the manifest path. Question ``q{i}`` asks the colour of image ``img/{i}.png``; with
    ``broken_image`` question ``q_broken`` points at a file that is not an image; with
    ``malformed`` one line is not JSON and one lacks its answers.
    """
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.new("RGB", (40 + 8 * i, 32), COLORS[color]).save(root / "img" / f"{i}.png")
        qtype = "color" if i % 2 == 0 else "what color"
        lines.append(json.dumps({"id": f"q{i}", "image": f"img/{i}.png", "question": "what is the color of the image?",
                                 "answers": [color] * 3 + ["gray"] * 7, "question_type": qtype}))
    if broken_image:
        (root / "img" / "broken.png").write_text("this is not a png")
        lines.insert(2, json.dumps({"id": "q_broken", "image": "img/broken.png", "question": "what color?",
                                    "answers": ["red"] * 10}))
    if malformed:
        lines.insert(4, "{not json")
        lines.append(json.dumps({"id": "q_noanswer", "image": "img/0.png", "question": "what color?"}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    manifest = root / "colors.yaml"
    manifest.write_text(
        "name: colors\nloader: jsonl\nsplit: test\n"
        "prompt: \"{question}\\nAnswer with a single word.\"\n"
        f"metric: {metric}\nmax_new_tokens: 2\noptions: {{path: data.jsonl}}\n"
    )
    return manifest


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread; on a shared CPU a second thread mostly waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def jsonl_task(tmp_path: Path) -> Path:
    return write_jsonl_task(tmp_path / "task")


def tiny_config(task: Path, out: Path, **extra) -> dict:
    """A bench config dict on the tiny random LLaVA."""
    cfg = {
        "name": "t",
        "output": str(out),
        "models": [{"name": "tiny", "source": "random-llava", "device": "cpu"}],
        "tasks": [str(task)],
        "pipelines": ["divprune:keep={budget}"],
        "budgets": [64],
        "batch_size": 3,
        "latency": False,
    }
    cfg.update(extra)
    return cfg
