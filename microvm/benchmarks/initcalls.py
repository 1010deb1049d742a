"""The slowest initcalls of a boot (`microvm bench boot --initcalls`).

With `initcall_debug` on its command line the kernel times every initcall
(init/main.c: "initcall %pS returned %d after %lld usecs", KERN_DEBUG). With
`quiet` those lines stay in the kernel's log buffer and cost the boot almost
nothing; the command the boot runs is `dmesg`, which prints them. Our kernel
has no kallsyms, so %pS prints a bare address: resolve() names it from the
vmlinux's own symbol table (a kernel without relocation runs at its link
addresses).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from microvm.loader.symbols import Symbols

INITCALL_LINE = re.compile(rb"initcall (\S+) returned (-?\d+) after (\d+) usecs")
CMDLINE_ARG = "initcall_debug"
COMMAND = ["dmesg"]
SHOWN = 15  # the slowest this many, per configuration


def parse(dmesg: bytes) -> list[tuple[str, int]]:
    """(function, microseconds) of every initcall the log shows, in order."""
    return [(m.group(1).decode(errors="replace"), int(m.group(3))) for m in INITCALL_LINE.finditer(dmesg)]


def slowest(runs: Sequence[Sequence[tuple[str, int]]], symbols: Symbols, n: int = SHOWN) -> list[dict[str, Any]]:
    """The n initcalls with the largest median time over the runs (a call
    missing from a run counts as absent there, not as 0)."""
    times: dict[str, list[int]] = {}
    for run in runs:
        for fn, usecs in run:
            times.setdefault(symbols.name(fn), []).append(usecs)
    ranked = sorted(times.items(), key=lambda item: (-statistics.median(item[1]), item[0]))
    return [{"initcall": name, "median_us": statistics.median(us), "max_us": max(us), "runs": len(us)}
            for name, us in ranked[:n]]


def total_us(run: Sequence[tuple[str, int]]) -> int:
    return sum(us for _, us in run)


def table_rows(result: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """(configuration, initcall, median ms, max ms, runs) for the report."""
    return [(label, r["initcall"], r["median_us"] / 1000, r["max_us"] / 1000, r["runs"])
            for label, rows in result.items() for r in rows]
