"""Shared by the benchmarks: on a PVM host, re-run this script in the lane."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rerun_in_lane_if_pvm() -> None:
    """Where guest kernel mode is emulated (PVM), run the same command line
    inside the hardware-virtualization lane and exit with its status."""
    if os.environ.get("MICROVM_IN_LANE") == "1":
        return
    from microvm.doctor import Verdict, host_verdict

    if host_verdict() is not Verdict.PVM:
        return
    from microvm.lane import run_in_lane

    print("PVM host: running this benchmark inside the hardware-virtualization lane", flush=True)
    result = run_in_lane([sys.executable, *sys.argv], cwd=str(ROOT), env={"MICROVM_IN_LANE": "1"}, timeout=3600)
    sys.exit(result.returncode)
