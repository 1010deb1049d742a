"""What the benchmarks' options may be, checked on the host before anything runs.

`microvm bench` (click, cli.py) and the bench/*.py scripts (argparse, the
types below) check every option while parsing the command line: on a PVM
host a bad value is then a usage error at once, not a failure inside the
hardware-virtualization lane after it has booted, with an output directory
already made. Kept free of heavy imports: `microvm --help` loads this module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from microvm.checks import MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB

KERNEL_FORMATS = ("elf", "bzimage")
CMDLINE_VARIANTS = ("quiet", "verbose")
# MicroVM's own limits, so the lane is not started for a value the VM would refuse.
MEM_MIB_RANGE = (MIN_MEM_MIB, MAX_MEM_MIB)
VCPUS_RANGE = (1, MAX_VCPUS)


def int_range(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least minimum (and at most maximum)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is more than {maximum}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse calls the type in other messages
    return parse


def kernel_choice(text: str) -> str:
    """An argparse type for bench/boot.py's --kernel: vmlinux, bzImage (our
    cached kernel) or the path of a kernel file."""
    if text not in ("vmlinux", "bzImage") and not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: neither vmlinux, bzImage nor a file")
    return text


def output_file(text: str) -> Path:
    """An argparse type: a file to write, in a directory that exists (so a typo
    fails now, not when the results are ready to be written)."""
    path = Path(text)
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: directory {str(path.parent)!r} does not exist")
    return path
