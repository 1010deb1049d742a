"""On a PVM host `microvm run` refuses an ordinary kernel at once, saying why."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from microvm.doctor import Verdict, check_host, host_verdict
from microvm.errors import UnsupportedHostError


def test_run_on_this_host() -> None:
    if host_verdict() is Verdict.PVM:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "microvm", "run", "--", "true"],
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "PVM" in lines[0] and "cannot run here" in lines[0] and "lane" in lines[0]
        assert elapsed < 15, f"took {elapsed:.1f} s to refuse"
        with pytest.raises(UnsupportedHostError):
            check_host()
    else:
        check_host()  # hardware virtualization: no objection
    check_host(force=True)  # --force always lets a user try
