"""Boot timeline per configuration: kernel format, command line, memory, vCPUs.

Each configuration boots `runs` times and runs `true`; the configurations take
turns (round-robin), so a slow spell of the host spreads over all of them.
One run yields:
  - the VMM's timeline (MicroVM.timeline()): seconds from start() to each
    phase mark (vm created ... vm ended);
  - the guest's own clock, from the printk timestamps on the console: the
    first kernel line and the last one before init (`Run /init as init
    process`). With `quiet` the kernel prints few lines or none, and these
    are missing;
  - for the QEMU row (qemu.py): seconds from spawning QEMU to the command's
    output ("command done") and to QEMU's exit ("vm ended").
"""

from __future__ import annotations

import itertools
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from microvm.benchmarks import qemu
from microvm.benchmarks.options import CMDLINE_VARIANTS, KERNEL_FORMATS
from microvm.benchmarks.report import Stats, summarize_metrics
from microvm.errors import ConfigError

VMM_PHASES = ("vm created", "memory mapped", "kernel loaded", "first vcpu entry", "init reached",
              "command started", "command done", "vm ended")
PRINTK_METRICS = ("guest first printk", "guest printk before init")
SHUTDOWN_LINE = b"reboot: "
METRICS = (*VMM_PHASES, *PRINTK_METRICS)
TOTAL = "command done"  # the boot is over when the first command has run

# `[    0.123456] text`: CONFIG_PRINTK_TIME's prefix, seconds of guest uptime.
PRINTK_LINE = re.compile(rb"^\[\s*(\d+\.\d+)\]")
INIT_LINE = b"Run /init as init process"


@dataclass(frozen=True)
class BootConfig:
    vmm: str  # "microvm" or "qemu"
    kernel_format: str  # "elf" (vmlinux, PVH entry) or "bzimage"
    mem_mib: int
    vcpus: int
    cmdline_variant: str  # "quiet" or "verbose"

    @property
    def label(self) -> str:
        return f"{self.vmm} {self.kernel_format} {self.mem_mib}M {self.vcpus}cpu {self.cmdline_variant}"

    def cmdline(self) -> str:
        from microvm.machine import DEFAULT_CMDLINE

        base = qemu.CMDLINE if self.vmm == "qemu" else DEFAULT_CMDLINE
        if self.cmdline_variant == "verbose":
            return " ".join(arg for arg in base.split() if arg != "quiet")
        return base


def configurations(kernel_formats: Sequence[str], mems: Sequence[int], vcpus: Sequence[int],
                   variants: Sequence[str], with_qemu: bool = False) -> list[BootConfig]:
    """Every combination, ours first, then QEMU's the same way."""
    for name, given, allowed in (("kernel format", kernel_formats, KERNEL_FORMATS),
                                 ("command line variant", variants, CMDLINE_VARIANTS)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ConfigError(f"{name} {', '.join(bad) or '(none)'}: choose from {', '.join(allowed)}")
    vmms = ("microvm", "qemu") if with_qemu else ("microvm",)
    return [BootConfig(*combo) for combo in itertools.product(vmms, kernel_formats, mems, vcpus, variants)]


def printk_times(console: bytes) -> dict[str, float]:
    """Guest uptime of the first kernel line and of the last one up to `Run
    /init` (all boot lines if it never shows); empty if no line has a
    timestamp. Lines from the shutdown (`reboot: ...`) are not boot lines: with
    `quiet` they may be the only ones, and would pass for a boot time."""
    first = last = None
    for line in console.splitlines():
        m = PRINTK_LINE.match(line)
        if m and SHUTDOWN_LINE in line:
            break
        if m:
            t = float(m.group(1))
            first = t if first is None else first
            last = t
            if INIT_LINE in line:
                break
    if first is None or last is None:
        return {}
    return {PRINTK_METRICS[0]: first, PRINTK_METRICS[1]: last}


def kernel_path(kernel_format: str) -> Path:
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise ConfigError("no guest kernel built yet: run `microvm kernel build`")
    return art.vmlinux if kernel_format == "elf" else art.bzimage


def boot_ours(config: BootConfig, timeout: float) -> dict[str, float]:
    from microvm.machine import MicroVM

    vm = MicroVM(kernel_path(config.kernel_format), mem_mib=config.mem_mib, vcpus=config.vcpus,
                 cmdline=config.cmdline())
    r = vm.run(["true"], timeout=timeout)
    if r.exit_code != 0:
        raise ConfigError(f"{config.label}: `true` exited {r.exit_code}\n{vm.console_tail()}")
    return {**r.timeline, **printk_times(r.console)}


def boot_qemu(config: BootConfig, initrd: Path, timeout: float) -> dict[str, float]:
    q = qemu.boot(kernel_path(config.kernel_format), initrd, mem_mib=config.mem_mib, vcpus=config.vcpus,
                  cmdline=config.cmdline(), timeout=timeout)
    return {"command done": q.marker_s, "vm ended": q.exit_s, **printk_times(q.console)}


def run(configs: Sequence[BootConfig], runs: int, *, timeout: float = 300,
        on_run: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Boot every configuration `runs` times; returns the raw runs and the
    stats per configuration and metric (JSON-ready apart from Stats)."""
    if runs < 1:
        raise ConfigError(f"runs must be at least 1, got {runs}")
    if any(c.vmm == "qemu" for c in configs) and not qemu.available():
        raise ConfigError(f"--qemu: {qemu.QEMU} is not installed")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        initrd = qemu.initramfs(Path(tmp) / "initrd.cpio")
        # One boot nobody counts: imports, the cached initramfs, the page cache.
        boot_ours(next(c for c in configs if c.vmm == "microvm"), timeout)
        for i, config in itertools.product(range(runs), configs):
            t0 = time.monotonic()
            metrics = boot_qemu(config, initrd, timeout) if config.vmm == "qemu" else boot_ours(config, timeout)
            records.append({"configuration": config.label, **asdict(config), "run": i + 1,
                            "wall": time.monotonic() - t0, **metrics})
            if on_run is not None:
                on_run(f"{config.label}: {metrics.get(TOTAL, 0) * 1000:.0f} ms")
    summary = {c.label: summarize_metrics([r for r in records if r["configuration"] == c.label], METRICS)
               for c in configs}
    return {"benchmark": "boot", "runs_per_configuration": runs, "metrics": list(METRICS),
            "kernels": {f: str(kernel_path(f)) for f in {c.kernel_format for c in configs}},
            "configurations": [asdict(c) | {"label": c.label, "cmdline": c.cmdline()} for c in configs],
            "runs": records, "summary": summary}


def phase_increments(summary: dict[str, Stats]) -> list[tuple[str, float]]:
    """(phase, median seconds since the previous phase) in timeline order:
    the stacked bar of one configuration."""
    out, prev = [], 0.0
    for phase in VMM_PHASES:
        if phase in summary:
            t = summary[phase].median
            out.append((phase, max(t - prev, 0.0)))
            prev = max(prev, t)
    return out
