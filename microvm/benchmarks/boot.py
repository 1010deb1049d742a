"""Boot timeline per configuration: kernel format, command line, memory, vCPUs.

Each configuration boots `runs` times and runs `true`; the configurations take
turns (round-robin), so a slow spell of the host spreads over all of them.
One run yields, by VMM:
  - microvm (in this process): the VMM's timeline (MicroVM.timeline()):
    seconds from start() to each phase mark (vm created ... vm ended);
  - `microvm run` (with --cli): a whole `microvm run -- true` process, from
    spawning it to its exit ("vm ended");
  - QEMU's microvm machine (with --qemu, qemu.py): seconds from spawning QEMU
    to the command's output ("command done") and to QEMU's exit ("vm ended");
  - and for all, the guest's own clock, from the printk timestamps on the
    console: the first kernel line and the last one before init (`Run /init
    as init process`). With `quiet` the kernel prints few lines or none, and
    these are missing.
With more than one VMM, comparison() puts each configuration's "command
done" and "vm ended" side by side, as ratios to QEMU's.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from microvm.benchmarks import guest, initcalls, qemu, report
from microvm.benchmarks.guest import RunFailed
from microvm.benchmarks.options import CMDLINE_VARIANTS, KERNEL_FORMATS, VMMS
from microvm.benchmarks.report import Stats, summarize_metrics
from microvm.errors import ConfigError

VMM_PHASES = ("vm created", "memory mapped", "kernel loaded", "first vcpu entry", "init reached",
              "command started", "command done", "vm ended")
PRINTK_METRICS = ("guest first printk", "guest printk before init")
SHUTDOWN_LINE = b"reboot: "
METRICS = (*VMM_PHASES, *PRINTK_METRICS)
TOTAL = "command done"  # the boot is over when the first command has run
COMPARED = (TOTAL, "vm ended")  # the marks every VMM has

# `[    0.123456] text`: CONFIG_PRINTK_TIME's prefix, seconds of guest uptime.
PRINTK_LINE = re.compile(rb"^\[\s*(\d+\.\d+)\]")
INIT_LINE = b"Run /init as init process"


@dataclass(frozen=True)
class BootConfig:
    vmm: str  # one of VMMS: "microvm", "microvm run" or "qemu"
    kernel_format: str  # "elf" (vmlinux, PVH entry) or "bzimage"
    mem_mib: int
    vcpus: int
    # "quiet", "verbose", "full-log" (quiet, with MicroVM(full_log=True)) or "jail" (quiet, MicroVM(jail=True))
    cmdline_variant: str

    @property
    def guest(self) -> str:
        """The configuration but for the VMM: what the VMMs are compared on."""
        return f"{self.kernel_format} {self.mem_mib}M {self.vcpus}cpu {self.cmdline_variant}"

    @property
    def label(self) -> str:
        return f"{self.vmm} {self.guest}"

    def cmdline(self) -> str:
        from microvm.machine import DEFAULT_CMDLINE

        base = qemu.CMDLINE if self.vmm == "qemu" else DEFAULT_CMDLINE
        if self.cmdline_variant == "verbose":
            return " ".join(arg for arg in base.split() if arg != "quiet")
        return base


def configurations(kernel_formats: Sequence[str], mems: Sequence[int], vcpus: Sequence[int],
                   variants: Sequence[str], vmms: Sequence[str] = ("microvm",)) -> list[BootConfig]:
    """Every combination, VMM by VMM in the order of VMMS (microvm, the one
    every run needs, among them)."""
    for name, given, allowed in (("kernel format", kernel_formats, KERNEL_FORMATS),
                                 ("command line variant", variants, CMDLINE_VARIANTS), ("VMM", vmms, VMMS)):
        bad = [g for g in given if g not in allowed]
        if bad or not given:
            raise ConfigError(f"{name} {', '.join(bad) or '(none)'}: choose from {', '.join(allowed)}")
    vmms = [vmm for vmm in VMMS if vmm in vmms or vmm == "microvm"]
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


def boot_ours(config: BootConfig, timeout: float, calls: list[list[tuple[str, int]]] | None = None,
              ) -> dict[str, float]:
    """One boot running `true`; with `calls`, one with initcall_debug running
    `dmesg`, whose initcalls (initcalls.parse) are appended to `calls`."""
    from microvm import teardown
    from microvm.machine import MicroVM

    cmdline, command = config.cmdline(), ["true"]
    if calls is not None:
        cmdline, command = f"{cmdline} {initcalls.CMDLINE_ARG}", initcalls.COMMAND
    vm = MicroVM(guest.kernel_path(config.kernel_format), mem_mib=config.mem_mib, vcpus=config.vcpus,
                 cmdline=cmdline, full_log=config.cmdline_variant == "full-log",
                 jail=config.cmdline_variant == "jail")
    r = vm.run(command, timeout=timeout)
    # Each boot alone: the kernel's destruction of this VM (off run()'s path,
    # teardown.py) and a jail's cleanup end here, not during the next boot.
    teardown.drain()
    if r.exit_code != 0:
        raise RunFailed(f"{config.label}: `{' '.join(command)}` exited {r.exit_code}\n{vm.console_tail()}")
    if calls is not None:
        found = initcalls.parse(r.stdout)
        if not found:
            raise RunFailed(f"{config.label}: dmesg shows no initcall times (initcall_debug)")
        calls.append(found)
    return {**r.timeline, **printk_times(r.console)}


def boot_cli(config: BootConfig, timeout: float) -> dict[str, float]:
    """`microvm run -- true` of the microvm package this process runs (its
    directory first on the child's path), spawn to exit."""
    import microvm

    root = str(Path(microvm.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "microvm", "run", "--kernel", str(guest.kernel_path(config.kernel_format)),
            "--mem", str(config.mem_mib), "--vcpus", str(config.vcpus), "--cmdline", config.cmdline(),
            "--timeout", str(timeout), *["--full-log"] * (config.cmdline_variant == "full-log"),
            *["--jail"] * (config.cmdline_variant == "jail"), "--", "true"]
    t0 = time.monotonic()
    try:  # the guest's timeout is the child's; this one is for a child stuck before its guest
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=2 * timeout)
    except subprocess.TimeoutExpired as e:
        raise RunFailed(f"{config.label}: `microvm run` did not end within {2 * timeout:.0f} s") from e
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RunFailed(f"{config.label}: `microvm run` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return {"vm ended": wall}


def boot_qemu(config: BootConfig, initrd: Path, timeout: float) -> dict[str, float]:
    q = qemu.run(guest.kernel_path(config.kernel_format), initrd, mem_mib=config.mem_mib, vcpus=config.vcpus,
                 cmdline=config.cmdline(), timeout=timeout)
    if q.marker_s is None:
        raise RunFailed(f"{config.label}: the command's output never showed:\n{q.text()[-2000:]}")
    return {"command done": q.marker_s, "vm ended": q.exit_s, **printk_times(q.console)}


def run(configs: Sequence[BootConfig], runs: int, *, timeout: float = 300,
        on_run: Callable[[str], None] | None = None, with_initcalls: bool = False) -> dict[str, Any]:
    """Boot every configuration `runs` times; returns the raw runs, the
    stats per configuration and metric and, with more than one VMM, their
    comparison (JSON-ready apart from Stats). with_initcalls: microvm's
    boots run with initcall_debug and `dmesg` (so "command done" includes
    printing the log), and "initcalls" has each configuration's slowest."""
    if runs < 1:
        raise ConfigError(f"runs must be at least 1, got {runs}")
    if any(c.vmm == "qemu" for c in configs) and not qemu.available():
        raise ConfigError(f"--qemu: {qemu.QEMU} is not installed")
    records: list[dict[str, Any]] = []
    calls: dict[str, list[list[tuple[str, int]]]] = {
        c.label: [] for c in configs if with_initcalls and c.vmm == "microvm"}
    boots: dict[str, Callable[[BootConfig], dict[str, float]]] = {
        "microvm": lambda c: boot_ours(c, timeout, calls[c.label] if with_initcalls else None),
        "microvm run": lambda c: boot_cli(c, timeout)}
    with qemu.initramfs() as initrd:
        boots["qemu"] = lambda c: boot_qemu(c, initrd, timeout)
        # One boot nobody counts: imports, the cached initramfs, the page cache.
        boot_ours(next(c for c in configs if c.vmm == "microvm"), timeout)
        for i, config in itertools.product(range(runs), configs):
            t0 = time.monotonic()
            metrics = boots[config.vmm](config)
            records.append({"configuration": config.label, **asdict(config), "run": i + 1,
                            "wall": time.monotonic() - t0, **metrics})
            if on_run is not None:
                on_run(f"{config.label}: {(metrics.get(TOTAL) or metrics.get('vm ended', 0)) * 1000:.0f} ms")
    summary = {c.label: summarize_metrics([r for r in records if r["configuration"] == c.label], METRICS)
               for c in configs}
    result = {"benchmark": "boot", "runs_per_configuration": runs, "metrics": list(METRICS),
              "kernels": {f: str(guest.kernel_path(f)) for f in {c.kernel_format for c in configs}},
              "configurations": [asdict(c) | {"label": c.label, "cmdline": c.cmdline()} for c in configs],
              "runs": records, "summary": summary, "comparison": comparison(configs, records)}
    if with_initcalls:
        symbols = initcalls.Symbols.of(guest.kernel_path("elf"))  # the bzImage's kernel too
        result["initcalls"] = {label: initcalls.slowest(runs_of, symbols) for label, runs_of in calls.items()}
        result["initcalls_total_ms"] = {label: [initcalls.total_us(r) / 1000 for r in runs_of]
                                        for label, runs_of in calls.items()}
    return result


def compared_metrics(configs: Sequence[BootConfig]) -> dict[str, tuple[str, str]]:
    """The comparison's rows: "GUEST: MARK" -> (label, unit), per guest configuration."""
    return {f"{g}: {mark}": (f"{g}: {mark}", "ms") for g in dict.fromkeys(c.guest for c in configs)
            for mark in COMPARED}


def comparison(configs: Sequence[BootConfig], records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Each guest configuration's COMPARED marks (ms) by VMM, and their ratios
    to QEMU's (report.compare); None with microvm alone."""
    vmms = list(dict.fromkeys(c.vmm for c in configs))
    if len(vmms) < 2:
        return None
    by_label = {c.label: c for c in configs}
    samples: dict[str, dict[str, list[float]]] = {vmm: {} for vmm in vmms}
    for rec in records:
        config = by_label[rec["configuration"]]
        for mark in COMPARED:
            if rec.get(mark) is not None:
                samples[config.vmm].setdefault(f"{config.guest}: {mark}", []).append(rec[mark] * 1e3)
    reference = "qemu" if "qemu" in vmms else "microvm"
    return report.compare(samples, list(compared_metrics(configs)),
                          [(vmm, reference) for vmm in vmms if vmm != reference])


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
