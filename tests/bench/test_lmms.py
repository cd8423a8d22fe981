"""lmms-eval: the vtc_llava wrapper runs a local task offline, and vtc's metrics agree with lmms-eval's scorers.

Needs lmms-eval (``pip install "vtc[lmms]"``); skipped without it. The first test runs the real
``lmms-eval`` command line on a local task (six questions of the embedded model's test split,
images on disk) with ``--model vtc_llava``, found through the ``lmms_eval.models`` entry point, and
checks its answers equal ``vtc.apply`` + ``generate`` run by hand. The second feeds the adversarial
cases of ``test_metrics.py`` to lmms-eval's own scoring functions and compares with vtc's.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'vtc[lmms]')")

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = "divprune:keep=16"


def _local_task(root: Path) -> list[dict]:
    """An lmms-eval task folder: data.jsonl (JSON builder of HF datasets), utils.py, vtc_local.yaml."""
    from vtc.bench.loaders import get_loader

    qs = list(itertools.islice(get_loader("tiny_scenes")(split="test", dataset="shapes"), 6))
    (root / "img").mkdir(parents=True)
    docs = []
    for i, q in enumerate(qs):
        q.load_image().save(root / "img" / f"{i}.png")
        docs.append({"question_id": q.qid, "question": q.question, "answer": q.answers[0], "image": str(root / "img" / f"{i}.png")})
    (root / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n")
    (root / "vtc_local.yaml").write_text(f"""task: vtc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 2
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""")
    return docs


def _entry_point_path(tmp: Path) -> list[str]:
    """Where the ``lmms_eval.models`` entry point comes from: the installed vtc, else a stand-in dist-info."""
    if any(ep.name == "vtc_llava" for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
        return []
    info = tmp / "ep" / "vtc_entry_point-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtc-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nvtc_llava = vtc.bench.lmms:manifest\n")
    return [str(tmp / "ep")]


def _by_hand(docs: list[dict]) -> list[str]:
    """vtc.apply + greedy generate on the same prompts: what the wrapper must answer."""
    import torch
    from PIL import Image

    import vtc
    from vtc.bench.models import DEFAULT_CHAT, ModelEntry, load_model

    model, processor = load_model(ModelEntry(name="t", source="tiny", path="tiny-llava", device="cpu"), torch.device("cpu"))
    out = []
    with vtc.apply(model, PIPELINE) as handle, torch.inference_mode():
        for d in docs:
            inputs = processor(images=[Image.open(d["image"]).convert("RGB")], text=[DEFAULT_CHAT.replace("{prompt}", d["question"])],
                               return_tensors="pt")
            ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
            out.append(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
            assert list(handle.last.counts) == [16]
    return out


def test_lmms_eval_runs_a_local_task_through_vtc(tmp_path):
    docs = _local_task(tmp_path / "task")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *_entry_point_path(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtc_llava",
           "--model_args", f'pretrained=tiny:tiny-llava,pipeline="{PIPELINE}"', "--tasks", "vtc_local",
           "--include_path", str(tmp_path / "task"), "--batch_size", "3", "--device", "cpu",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("*_results.json")
    (samples,) = (tmp_path / "out").rglob("*_samples_vtc_local.jsonl")
    answers = {}
    for s in map(json.loads, samples.read_text().splitlines()):
        resp = s["filtered_resps"]
        answers[s["doc_id"]] = resp if isinstance(resp, str) else resp[0]
    expected = _by_hand(docs)
    assert [answers[i] for i in range(len(docs))] == expected
    score = json.loads(results.read_text())["results"]["vtc_local"]["exact_match,none"]
    assert score == pytest.approx(sum(a.strip().lower() == d["answer"] for a, d in zip(expected, docs)) / len(docs))
    assert "16.0 visual tokens" in proc.stdout + proc.stderr   # the wrapper reports what the LLM received


def test_vtc_metrics_agree_with_lmms_eval_scorers():
    """The parametrized adversarial cases of test_metrics.py, scored by lmms-eval 0.7's own functions."""
    import test_metrics as T
    from lmms_eval.api.metrics import exact_match_hf_evaluate
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    from lmms_eval.tasks.mmbench.mmbench_evals import MMBench_Evaluator
    from lmms_eval.tasks.mme.utils import parse_pred_ans
    from lmms_eval.tasks.ocrbench.utils import ocrbench_process_results
    from lmms_eval.tasks.seedbench.utils import seed_aggregation_result, seed_process_result
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results

    from vtc.bench.metrics import (
        gqa_exact_match,
        mmbench_option,
        mme_answer,
        ocrbench_correct,
        seed_correct,
        textvqa_accuracy,
    )
    from vtc.bench.normalize import evalai_answer

    def cases(test):
        return next(m.args[1] for m in test.pytestmark if m.name == "parametrize")

    for pred, answers, _ in cases(T.test_textvqa):
        ref = textvqa_process_results({"question_id": 1, "answers": list(answers)}, [pred])["exact_match"]
        assert textvqa_accuracy(pred, answers) == pytest.approx(ref), pred
    for pred, answers, _ in cases(T.test_exact):
        ref = max(exact_match_hf_evaluate([pred.strip()], [a], ignore_case=True, ignore_punctuation=True)["exact_match"]
                  for a in answers)
        assert gqa_exact_match(pred, answers) == ref, pred
    for pred, _ in cases(T.test_mme_reading):
        assert mme_answer(pred) == parse_pred_ans(pred), pred
    evaluator = MMBench_Evaluator()
    for pred, _ in cases(T.test_mmbench_option):
        assert mmbench_option(pred, T.CHOICES) == (evaluator.can_infer(pred, dict(T.CHOICES)) or None), pred
    for pred, gold, _ in cases(T.test_seed):
        r = seed_process_result({"answer": gold, "data_type": "image", "question_id": 1}, [pred])["seed_all"]
        assert seed_correct(pred, gold) == (seed_aggregation_result([r]) == 1.0), pred
    for pred, answers, dataset, _ in cases(T.test_ocrbench):
        r = ocrbench_process_results({"answer": answers, "dataset": dataset, "question_type": "x"}, [pred])
        assert ocrbench_correct(pred, answers, dataset) == (r["ocrbench_accuracy"]["score"] == 1), pred
    processor = EvalAIAnswerProcessor()
    rng = random.Random(0)
    alphabet = list("abcdeos '.,?!;:-/()$%#\n\t0123456789") + ["the ", "a ", "two", "dont", "what's", "hed've", "1,000", " Im"]
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert evalai_answer(s) == processor(s), repr(s)
