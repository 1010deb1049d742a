"""`microvm run` with no command: the guest's shell on the serial console,
fed from a pipe (input there before the shell is up, its end an EOF) or
typed on a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "microvm", "run", "--timeout", "60"]


def run_piped(data: bytes, timeout: int = 60) -> subprocess.CompletedProcess[bytes]:
    """`printf DATA | microvm run`: all of it written, and the pipe closed, before the guest boots."""
    argv = [*RUN[:-1], str(timeout)]
    return subprocess.run(argv, input=data, capture_output=True, cwd=ROOT, timeout=timeout + 120)


def test_piped_command_runs_and_sets_the_exit_status() -> None:
    r = run_piped(b"echo hi; exit 4\n")
    assert r.returncode == 4, r.stderr.decode(errors="replace")
    assert b"hi" in r.stdout
    assert re.search(rb"(?m)^hi\r?$", r.stdout), r.stdout  # the output, not only the echoed command
    assert b"timed out" not in r.stderr and b"did not finish" not in r.stderr


def test_several_piped_lines_run_in_order() -> None:
    r = run_piped(b"x=5\necho got-$x\ncd /tmp\npwd\necho $((x * 7)); exit 3\n")
    assert r.returncode == 3, r.stderr.decode(errors="replace")
    out = r.stdout
    assert b"got-5" in out and b"/tmp" in out and b"35" in out
    assert out.index(b"got-5") < out.index(b"/tmp") < out.rindex(b"35")


def test_end_of_input_ends_the_shell() -> None:
    r = run_piped(b"echo first-$((1 + 1))\necho second-$((2 + 2))\n")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"first-2" in r.stdout and b"second-4" in r.stdout


def test_end_of_input_gives_the_shells_status_and_ends_the_last_line() -> None:
    r = run_piped(b"echo before-$((3 * 3))\nfalse")  # no newline at the end
    assert r.returncode == 1, r.stderr.decode(errors="replace")
    assert b"before-9" in r.stdout


def _read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    seen = bytearray()
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted!r} within {timeout} s; got {bytes(seen[-2000:])!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side is gone
                chunk = b""
            if not chunk:
                raise AssertionError(f"end of output before {wanted!r}; got {bytes(seen[-2000:])!r}")
            seen += chunk
    return bytes(seen)


def test_a_terminal_gets_a_raw_interactive_shell() -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        proc = subprocess.Popen(RUN, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
        try:
            _read_until(master, b"# ", 120)  # the shell's prompt
            os.write(master, b"echo $((6 * 7))\r")  # Enter on a raw terminal is CR
            _read_until(master, b"42", 30)
            os.write(master, b"exit 5\r")
            assert proc.wait(60) == 5
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert termios.tcgetattr(slave) == before  # the terminal is back as it was
    finally:
        os.close(master)
        os.close(slave)


@pytest.fixture(autouse=True)
def _kernel_built() -> None:
    from microvm.kernelbuild import find_default_kernel

    if find_default_kernel() is None:
        pytest.fail("no guest kernel built: run `microvm kernel build`")


def test_the_shells_last_output_is_not_lost_when_it_exits() -> None:
    # The shell exits with its last lines still in the guest's UART buffer:
    # the session's end must not throw them away (a hangup of the terminal
    # discards unsent output).
    r = run_piped(b"seq 1 1000; exit 4\n", timeout=300)
    assert r.returncode == 4, r.stderr.decode(errors="replace")
    lines = re.findall(rb"(?m)^(\d+)\r?$", r.stdout)
    assert lines[-1] == b"1000" and len(lines) >= 1000, r.stdout[-500:]
