"""``import vtc``: the public API is there and importing it pulls in no heavy model library."""

import json
import subprocess
import sys
from pathlib import Path

import vtc

ROOT = Path(__file__).resolve().parents[1]


def test_public_api():
    for name in ("VisualTokens", "Layout", "Pipeline", "build", "create", "register", "list_ops", "apply",
                 "VtcError", "__version__"):
        assert hasattr(vtc, name), name


def test_import_vtc_needs_only_torch():
    code = (
        "import sys, json, vtc; vtc.list_ops(); vtc.build('divprune:keep=4'); "
        "print(json.dumps(sorted(m for m in ('transformers', 'timm', 'open_clip', 'xformers', 'sklearn', "
        "'matplotlib') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
