"""Run a benchmark where Linux guests can run: on a PVM host, inside the lane.

On a PVM host (ENVIRONMENT.md: guest kernel mode is emulated) a Linux guest
cannot boot, so the benchmark's own command line is run again inside the
hardware-virtualization lane (microvm/lane.py) and this process exits with
its status. Files the benchmark writes reach the host only through the lane's
read-write share, so the caller names the directory it writes to.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import microvm

IN_LANE_ENV = "MICROVM_IN_LANE"
# The directory holding the microvm package, so the lane imports this very checkout.
PACKAGE_ROOT = Path(microvm.__file__).resolve().parent.parent


def in_lane() -> bool:
    return os.environ.get(IN_LANE_ENV) == "1"


def needs_lane() -> bool:
    """True on a PVM host (outside the lane), where guests must run in the lane."""
    if in_lane():
        return False
    from microvm.doctor import Verdict, host_verdict

    return host_verdict() is Verdict.PVM


def rerun_in_lane_if_pvm(argv: Sequence[str] | None = None, *, what: str = "this benchmark",
                         out_dir: Path | None = None, smp: int | None = None,
                         timeout: float = 3600) -> None:
    """On a PVM host, run argv (default: this script's command line) in the
    lane and exit with its status; elsewhere return at once.

    out_dir is shared read-write with the lane at the same path, so results
    written there survive; smp is the lane's CPU count (for parallel runs).
    """
    if not needs_lane():
        return
    from microvm.lane import LaneError, run_in_lane

    command = list(argv) if argv is not None else [sys.executable, *sys.argv]
    print(f"PVM host: running {what} inside the hardware-virtualization lane", flush=True)
    env = {IN_LANE_ENV: "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
    if "MICROVM_CACHE" in os.environ:
        env["MICROVM_CACHE"] = os.environ["MICROVM_CACHE"]
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_in_lane(command, cwd=os.getcwd(), env=env, out_dir=out_dir, smp=smp, timeout=timeout)
    except LaneError as e:
        print(f"the hardware-virtualization lane failed: {e}", file=sys.stderr)
        sys.exit(125)
    sys.exit(result.returncode)
