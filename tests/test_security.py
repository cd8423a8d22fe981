"""SECURITY.md's "never" statements, checked against the source: no unpickling, YAML through safe_load only."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "unpickling": re.compile(r"\bimport pickle\b|\bpickle\.loads?\(|\btorch\.load\(|allow_pickle\s*=\s*True|\bjoblib\.load\("),
    "unsafe YAML": re.compile(r"\byaml\.(load|full_load|unsafe_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "pickled checkpoints": re.compile(r"use_safetensors\s*=\s*False"),
}


def test_the_source_never_unpickles_nor_loads_yaml_unsafely():
    found = []
    for path in sorted([*(ROOT / "vtc").rglob("*.py"), *(ROOT / "eval").rglob("*.py"), ROOT / "setup.py"]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for what, pattern in FORBIDDEN.items():
                if pattern.search(code):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_scan_finds_what_it_looks_for():
    lines = ["x = torch.load(f)", "import pickle", "yaml.load(s)", "eval(cfg)", "use_safetensors=False"]
    assert all(any(p.search(line) for p in FORBIDDEN.values()) for line in lines)
    assert not any(p.search("yaml.safe_load(s); model.eval(); obj.exec_module(m)") for p in FORBIDDEN.values())
