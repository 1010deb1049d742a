"""Run a benchmark where Linux guests can run: on a PVM host, inside the lane.

On a PVM host guest kernel mode is emulated instruction by instruction, so
an unmodified Linux kernel cannot run; the benchmark's own command line is
run again inside the hardware-virtualization lane (run.py) and this process
exits with its status. Files the benchmark writes reach the host only
through the lane's read-write share, so the caller names the directory it
writes to.

The lane's serial console carries the command's stdout and stderr as one
stream. To keep them apart, the command (in the lane) starts each line it
writes to sys.stderr with STDERR_TAG, and the host sends those lines to its
own stderr: progress and errors stay off stdout, as they do outside the lane.
Every caller should have checked its options before: a lane takes seconds
to boot.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from microvm.errors import LaneError
from microvm.lane.run import run_in_lane

IN_LANE_ENV = "MICROVM_IN_LANE"
# Starts each line the command in the lane writes to stderr (ASCII record separator).
STDERR_TAG = "\x1e"
_LINES = re.compile(r"[^\n]*\n|[^\n]+")
# The directory holding the microvm package, so the lane imports this very checkout.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def in_lane() -> bool:
    return os.environ.get(IN_LANE_ENV) == "1"


def needs_lane() -> bool:
    """True on a PVM host (outside the lane), where guests must run in the lane."""
    if in_lane():
        return False
    from microvm.doctor import Verdict, host_verdict  # here: it needs the KVM extension, the lane does not

    return host_verdict() is Verdict.PVM


class TaggedStderr:
    """In the lane: sys.stderr, with STDERR_TAG at the start of every line.

    Not a terminal, whatever the console is: progress is then written line by
    line (report.progress), and the host sorts lines, not screen updates."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in _LINES.findall(text):  # each a line with its "\n", the last maybe without
            if self._line_start:
                out.append(STDERR_TAG)
            out.append(piece)
            self._line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def writelines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.write(line)

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # flush, fileno, encoding, buffer, ...
        return getattr(self.stream, name)


class StderrRouter:
    """On the host: stands in for sys.stdout while the lane's console is
    copied to it; lines with STDERR_TAG go to stderr (untagged), the rest to
    stdout. Holds a partial line until its end or close()."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.stderr_lines = 0
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._route(line + "\n")
        return len(text)

    def _route(self, line: str) -> None:
        if line.startswith(STDERR_TAG):
            self.stderr_lines += 1
            self.err.write(line.removeprefix(STDERR_TAG))
            self.err.flush()
        else:
            self.out.write(line)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def close(self) -> None:
        """Route what is left of the last line, and flush."""
        if self._partial:
            self._route(self._partial)
            self._partial = ""
        self.out.flush()
        self.err.flush()


def tag_stderr() -> None:
    """In the lane: tag this process's stderr lines for the host (once)."""
    if not isinstance(sys.stderr, TaggedStderr):
        sys.stderr = TaggedStderr(sys.stderr)


def rerun_in_lane_if_pvm(argv: Sequence[str] | None = None, *, what: str = "this benchmark",
                         out_dir: Path | None = None, smp: int | None = None,
                         timeout: float = 3600, mem_mib: int = 2048) -> None:
    """On a PVM host, run argv (default: this script's command line) in the
    lane and exit with its status; elsewhere return at once.

    out_dir is shared read-write with the lane at the same path, so results
    written there survive; smp is the lane's CPU count (for parallel runs),
    mem_mib its memory.
    """
    if in_lane():
        tag_stderr()
        return
    if not needs_lane():
        return
    command = list(argv) if argv is not None else [sys.executable, *sys.argv]
    print(f"PVM host: running {what} inside the hardware-virtualization lane", file=sys.stderr, flush=True)
    env = {IN_LANE_ENV: "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
    router = StderrRouter(sys.stdout, sys.stderr)
    try:
        # run_in_lane copies the command's output to sys.stdout: the router sorts it.
        with contextlib.redirect_stdout(router), contextlib.closing(router):
            result = run_in_lane(command, cwd=os.getcwd(), env=env, out_dir=out_dir, smp=smp, timeout=timeout,
                                 mem_mib=mem_mib)
    except LaneError as e:
        print(f"the hardware-virtualization lane failed: {str(e).replace(STDERR_TAG, '')}", file=sys.stderr)
        sys.exit(125)
    if result.returncode and not router.stderr_lines:
        print(f"{what} failed in the hardware-virtualization lane (exit {result.returncode})", file=sys.stderr)
    sys.exit(result.returncode)
