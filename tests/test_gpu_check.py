"""eval/gpu_check.sh: every GPU check declares its time budget, and all of them fit one device session.

A lent device gives a session 15 minutes, start-up included; the prepared run must stay under 8.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 8 * 60


def budgets() -> dict[str, int]:
    out = {}
    for path in sorted((ROOT / "eval" / "gpu").glob("*.py")):
        m = re.match(r"# budget: *(\d+)", path.read_text().splitlines()[0])
        assert m, f"{path.name}: its first line must be '# budget: SECONDS' (eval/gpu_check.sh reads it)"
        out[path.name] = int(m.group(1))
    return out


def test_every_check_has_a_budget_and_all_fit_in_eight_minutes():
    b = budgets()
    assert b, "no GPU checks found under eval/gpu"
    assert sum(b.values()) <= LIMIT_S, f"GPU checks' budgets add up to {sum(b.values())} s > {LIMIT_S} s: {b}"


def test_every_check_takes_out_and_a_cpu_smoke_flag():
    for path in sorted((ROOT / "eval" / "gpu").glob("*.py")):
        text = path.read_text()
        for flag in ('"--out"', '"--device"', '"--smoke"'):
            assert flag in text, f"{path.name} lacks {flag}"
