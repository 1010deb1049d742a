"""The lane's per-test progress file (tests/boot/conftest.py): what a frozen
lane's outer run reads back to start again from the unfinished test."""

from __future__ import annotations

from pathlib import Path

from tests.boot.conftest import _Progress, _read_progress


def test_finished_tests_are_read_back_and_the_running_one_named(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    p = _Progress(str(path))
    p.write({"event": "start", "nodeid": "t.py::a"})
    p.write({"event": "end", "nodeid": "t.py::a", "outcome": "passed", "text": ""})
    p.write({"event": "start", "nodeid": "t.py::b"})
    p.write({"event": "end", "nodeid": "t.py::b", "outcome": "failed", "text": "assert 0"})
    p.write({"event": "start", "nodeid": "t.py::c"})
    p.close()
    with path.open("a") as f:
        f.write('{"event": "end", "nodeid": "t.py::c", "outc')  # the lane froze mid-write
    outcomes: dict[str, tuple[str, str]] = {}
    assert _read_progress(path, outcomes) == "t.py::c"
    assert outcomes == {"t.py::a": ("passed", ""), "t.py::b": ("failed", "assert 0")}


def test_between_tests_nothing_is_running_and_no_file_is_no_progress(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    outcomes: dict[str, tuple[str, str]] = {}
    assert _read_progress(path, outcomes) is None and outcomes == {}
    p = _Progress(str(path))
    p.write({"event": "start", "nodeid": "t.py::a"})
    p.write({"event": "end", "nodeid": "t.py::a", "outcome": "skipped", "text": "no tap"})
    p.close()
    assert _read_progress(path, outcomes) is None
    assert outcomes == {"t.py::a": ("skipped", "no tap")}
