"""MicroVM(seccomp=...): the VMM's threads under a filter (microvm/seccomp.py).

Each case runs in a subprocess (a filter is for good, and "kill" ends the
process): a tiny guest whose control-device write makes the vCPU thread do
what its filter allows, or not."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from microvm.errors import ConfigError
from microvm.machine import MicroVM

SCRIPT = """
import socket, sys
sys.path.insert(0, {repo!r})
from microvm.devices.control import ControlDevice
from microvm.machine import MicroVM
from tests.kvm.pvh import tiny_pvh_kernel

write = ControlDevice.write

def write_then(self, offset, size, value):
    {action}
    write(self, offset, size, value)

ControlDevice.write = write_then
vm = MicroVM(tiny_pvh_kernel(1, 5), force=True, mem_mib=32, seccomp={mode!r})
try:
    r = vm.run(["true"], timeout=30)
    print("status", r.exit_code)
except Exception as e:
    print("error", type(e).__name__, e)
socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()  # this thread was never filtered
print("main thread free")
"""


def run(mode: str, action: str) -> subprocess.CompletedProcess[str]:
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT).format(repo=repo, mode=mode,
                                                                              action=action)],
                          capture_output=True, text=True, timeout=120)


def test_a_vm_runs_under_its_filter_and_the_callers_thread_stays_free() -> None:
    # What the vCPU thread does anyway: write to an fd, read the time, a Unix socket.
    p = run("kill", "import os, time; os.write(2, b''); time.monotonic(); "
                    "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["status 5", "main thread free"], p.stdout


def test_a_forbidden_call_from_a_vmm_thread_kills_the_process() -> None:
    p = run("kill", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    assert p.returncode == -signal.SIGSYS, (p.returncode, p.stdout, p.stderr)
    assert "status" not in p.stdout


def test_errno_mode_fails_the_call_and_the_run_names_it() -> None:
    p = run("errno", "socket.socket(socket.AF_INET, socket.SOCK_STREAM)")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("error ") and "Operation not permitted" in p.stdout, p.stdout
    assert p.stdout.splitlines()[-1] == "main thread free"


def test_opening_a_file_fails_rather_than_kills() -> None:
    """A traceback's source lines need open(): EPERM, never the process."""
    p = run("kill", "open('/etc/hostname').close()")
    assert p.returncode == 0, p.stderr
    assert "Operation not permitted" in p.stdout and p.stdout.splitlines()[-1] == "main thread free", p.stdout


@pytest.mark.parametrize("bad", ["strict", True, 1])
def test_bad_seccomp_values_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError, match="seccomp"):
        MicroVM(seccomp=bad)  # type: ignore[arg-type]
