"""microvm.lane.rerun: a benchmark re-run in the lane, its stderr kept apart from its stdout."""

from __future__ import annotations

import io
import sys
from typing import Any

import pytest

from microvm.errors import LaneError
from microvm.lane import LaneResult, rerun, run
from microvm.lane.initrd import END_MARK, START_MARK


def test_tagged_stderr_lines_reach_the_hosts_stderr() -> None:
    inner = io.StringIO()
    tagged = rerun.TaggedStderr(inner)
    tagged.write("progress 1/2")
    tagged.write(" done\nprogress 2/2\n\nmicrovm: error: boom\n")
    assert not tagged.isatty()
    out, err = io.StringIO(), io.StringIO()
    router = rerun.StderrRouter(out, err)
    # The lane's console: stdout and the tagged stderr, one stream.
    for chunk in ("table row 1\n", inner.getvalue()[:7], inner.getvalue()[7:], "table row 2\n", "last"):
        router.write(chunk)
    router.close()
    assert out.getvalue() == "table row 1\ntable row 2\nlast"
    assert err.getvalue() == "progress 1/2 done\nprogress 2/2\n\nmicrovm: error: boom\n"
    assert router.stderr_lines == 4


def _fake_lane(console: bytes, returncode: int) -> Any:
    """run_in_lane that copies console through the real console splitter."""

    def run_in_lane(argv: list[str], **kwargs: Any) -> LaneResult:
        splitter = run._Console(stream=True)
        splitter.feed(console, final=True)
        return LaneResult(returncode, "".join(splitter.output), 1.0)

    return run_in_lane


def test_rerun_in_lane_sends_the_inner_error_to_stderr(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(rerun.IN_LANE_ENV, raising=False)
    monkeypatch.setattr(rerun, "needs_lane", lambda: True)
    tag = rerun.STDERR_TAG.encode()
    console = (b"kernel noise\r\n" + START_MARK.encode() + b"\r\n" + b"a result\r\n" + tag + b"booting: 1/1\r\n"
               + tag + b"microvm: error: runs must be at least 1, got 0\r\n" + END_MARK.encode() + b"\r\n")
    monkeypatch.setattr(rerun, "run_in_lane", _fake_lane(console, 1))
    with pytest.raises(SystemExit) as exited:
        rerun.rerun_in_lane_if_pvm(["true"], what="the test")
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "a result\n"
    assert captured.err.splitlines() == ["PVM host: running the test inside the hardware-virtualization lane",
                                         "booting: 1/1", "microvm: error: runs must be at least 1, got 0"]

    # A failure that wrote nothing to stderr (killed, say) still says so there.
    monkeypatch.setattr(rerun, "run_in_lane", _fake_lane(START_MARK.encode() + b"\n" + END_MARK.encode(), 9))
    with pytest.raises(SystemExit):
        rerun.rerun_in_lane_if_pvm(["true"], what="the test")
    captured = capsys.readouterr()
    assert captured.out == "" and "the test failed in the hardware-virtualization lane (exit 9)" in captured.err

    def broken(argv: list[str], **kwargs: Any) -> None:
        raise LaneError("lane unavailable: no QEMU")

    monkeypatch.setattr(rerun, "run_in_lane", broken)
    with pytest.raises(SystemExit) as exited:
        rerun.rerun_in_lane_if_pvm(["true"])
    assert exited.value.code == 125
    captured = capsys.readouterr()
    assert captured.out == "" and "lane unavailable: no QEMU" in captured.err


def test_in_the_lane_stderr_is_tagged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rerun.IN_LANE_ENV, "1")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    rerun.rerun_in_lane_if_pvm()
    rerun.rerun_in_lane_if_pvm()  # tagged once, not twice
    print("microvm: error: boom", file=sys.stderr)
    assert err.getvalue() == rerun.STDERR_TAG + "microvm: error: boom\n"
