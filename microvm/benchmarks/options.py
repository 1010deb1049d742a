"""What the benchmarks' options may be, checked on the host before anything runs.

`microvm bench` (cli.py) checks every option while click parses the command
line: on a PVM host a bad value is then a usage error at once, not a failure
inside the hardware-virtualization lane after it has booted, with an output
directory already made. Kept free of heavy imports: `microvm --help` loads
this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from microvm.checks import MAX_MEM_MIB, MAX_VCPUS, MIN_MEM_MIB

KERNEL_FORMATS = ("elf", "bzimage")
CMDLINE_VARIANTS = ("quiet", "verbose", "full-log", "jail")
# What `bench boot` boots with: this process, a `microvm run` process, QEMU.
VMMS = ("microvm", "microvm run", "qemu")
# MicroVM's own limits, so the lane is not started for a value the VM would refuse.
MEM_MIB_RANGE = (MIN_MEM_MIB, MAX_MEM_MIB)
VCPUS_RANGE = (1, MAX_VCPUS)
EXITS_RANGE = (1, 2**32 - 1)  # the exits guest's loop counter is ecx

Callback = Callable[[click.Context, click.Parameter, str], list[Any]]


def _words(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise click.BadParameter("no value given")
    return words


def choices(allowed: Sequence[str]) -> Callback:
    """A click callback: comma-separated words, each one of allowed (repeats dropped)."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
        words = _words(value)
        bad = [w for w in words if w not in allowed]
        if bad:
            raise click.BadParameter(f"{', '.join(map(repr, bad))}: choose from {', '.join(allowed)}")
        return list(dict.fromkeys(words))

    return check


def ints(low: int, high: int) -> Callback:
    """A click callback: comma-separated integers, each in low..high (repeats dropped)."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
        words = _words(value)
        try:
            numbers = [int(w) for w in words]
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None
        bad = [n for n in numbers if not low <= n <= high]
        if bad:
            raise click.BadParameter(f"{', '.join(map(str, bad))}: each must be between {low} and {high}")
        return list(dict.fromkeys(numbers))

    return check
