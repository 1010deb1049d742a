"""The lane's command line, behind tests/hwvirt/run: options, then the command.

Everything from the first word that is not an option (or after `--`) is the
command, its own options included, so `run python3 -c CODE` needs no `--`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from microvm.errors import LaneError, LaneTimeout
from microvm.lane.run import DEFAULT_SMP, PASSED_ENV, run_in_lane

# As timeout(1) and env(1) answer for themselves rather than for the command.
EXIT_TIMEOUT = 124
EXIT_LANE_FAILED = 125

DESCRIPTION = """\
Run a command where /dev/kvm is real KVM, even on a PVM host (whose KVM
emulates guest kernel mode, so Linux guests cannot run there): the lane boots
Linux in QEMU with TCG and an emulated AMD-V CPU and runs the command inside.
"""

EPILOG = f"""\
The command runs in a chroot of the host's / (read-only, with a throw-away
writable layer on top), so it sees this checkout and the host's tools; only
--out DIR reaches back to the host, mounted at the same path, named by
$MICROVM_LANE_OUT inside. $MICROVM_LANE is 1 inside.

Exit status: the command's; {EXIT_TIMEOUT} if it did not finish within --timeout;
{EXIT_LANE_FAILED} if the lane itself failed (no QEMU, the guest stopped early, ...).
"""


def _env_item(text: str) -> tuple[str, str | None]:
    """K=V sets K; a bare K passes the host's value of K on (None: unset there)."""
    key, eq, value = text.partition("=")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"{text!r} is not K=V or K, with K a variable name")
    return key, value if eq else os.environ.get(key)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def parser(prog: str, cwd_default: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, usage="%(prog)s [OPTION ...] [--] CMD [ARG ...]",
                                description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cwd", default=cwd_default, metavar="DIR",
                   help=f"working directory of the command (default: {cwd_default})")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="host directory shared read-write, at the same path (default: a temp dir, discarded)")
    p.add_argument("--timeout", type=_seconds, default=1800, metavar="SECONDS",
                   help="kill the lane after this long (default: %(default)s)")
    p.add_argument("--env", type=_env_item, action="append", default=[], metavar="K=V",
                   help="set K in the command's environment; a bare K passes the host's value on "
                        f"(repeatable; these pass by themselves: {', '.join(PASSED_ENV)})")
    p.add_argument("--smp", type=_positive, default=DEFAULT_SMP, metavar="N",
                   help="the lane's CPU count (default: %(default)s; more than 1 has been seen to hang)")
    p.add_argument("--mem", type=_positive, default=2048, metavar="MIB", help="the lane's memory (default: 2048)")
    p.add_argument("--debug", action="store_true", help="show kernel messages and trace the lane's init")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD ...", help="the command and its arguments")
    return p


def main(args: Sequence[str] | None = None, *, prog: str = "tests/hwvirt/run", cwd: str | None = None) -> int:
    """Parse args, run the command in the lane and return the exit status
    (cwd: the default working directory, else the current one)."""
    p = parser(prog, cwd or os.getcwd())
    ns = p.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        p.error("no command given")
    env = {key: value for key, value in ns.env if value is not None}
    try:
        result = run_in_lane(command, cwd=os.path.abspath(ns.cwd), env=env, timeout=ns.timeout, out_dir=ns.out,
                             smp=ns.smp, mem_mib=ns.mem, debug=ns.debug)
    except LaneError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_TIMEOUT if isinstance(e, LaneTimeout) else EXIT_LANE_FAILED
    print(f"{prog}: exit {result.returncode} after {result.wall_s:.1f} s", file=sys.stderr)
    return result.returncode
