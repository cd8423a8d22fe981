"""The README stays true: its Python examples run, and CI runs its test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    cmds = [b.strip() for b in _blocks("bash") if "pytest" in b]
    assert cmds, "README has no test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmds[0] in [line.strip() for line in ci]


@pytest.mark.parametrize("i", range(len(_blocks("python"))))
def test_python_examples_run(i):
    code = _blocks("python")[i]
    exec(compile(code, f"README.md[python block {i}]", "exec"), {"__name__": "__readme__"})
