"""vtc.bench.files: whole-file writes are atomic, damaged JSON gives a RunFolderError naming the file."""

from __future__ import annotations

import pytest

from vtc.bench.files import atomic_open, read_json, write_json, write_text
from vtc.errors import RunFolderError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "cells" / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(path) as fh:
        fh.write('{"v": 2, "trunc')  # the process dies here
        raise RuntimeError("killed")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
    write_text(path, '{"v": 3}')
    assert read_json(path) == {"v": 3} and [p.name for p in path.parent.iterdir()] == ["a.json"]
    with atomic_open(tmp_path / "b.png", "wb") as fh:
        fh.write(b"\x89PNG")
    assert (tmp_path / "b.png").read_bytes() == b"\x89PNG"


@pytest.mark.parametrize("content, what", [('{"id": "x", "summ', "truncated"), ("", "empty"), (b"\xff\xfe", "UTF-8")])
def test_damaged_json_names_the_file_and_the_fix(tmp_path, content, what):
    path = tmp_path / "c.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RunFolderError, match=what) as e:
        read_json(path, fix="rerun vtc bench")
    assert str(path) in str(e.value) and str(e.value).endswith("rerun vtc bench")
