"""`microvm bench ...`: boot, footprint, rate.

Each command prints a table and writes its results under --out. On a PVM
host it first re-runs itself inside the hardware-virtualization lane (microvm.lane),
with --out shared so the files come back. Every option is checked here, on
the host, before that: a bad value is a usage error (exit 2) at once, and
nothing is created under --out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from microvm.benchmarks.options import CMDLINE_VARIANTS, KERNEL_FORMATS, MEM_MIB_RANGE, VCPUS_RANGE
from microvm.clierrors import one_line_errors

F = TypeVar("F", bound=Callable[..., Any])
Callback = Callable[[click.Context, click.Parameter, str], list[Any]]
DEFAULT_OUT = "build/bench"


def _words(value: str) -> list[str]:
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words:
        raise click.BadParameter("no value given")
    return words


def _choices(allowed: Sequence[str]) -> Callback:
    """A click callback: comma-separated words, each one of allowed (repeats dropped)."""

    def check(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
        words = _words(value)
        bad = [w for w in words if w not in allowed]
        if bad:
            raise click.BadParameter(f"{', '.join(map(repr, bad))}: choose from {', '.join(allowed)}")
        return list(dict.fromkeys(words))

    return check


def _ints(low: int, high: int) -> Callback:
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


def _in_lane(command: str, out: Path, smp: int | None = None) -> None:
    """On a PVM host: run this same command line in the lane, then exit."""
    from microvm.lane import rerun_in_lane_if_pvm

    rerun_in_lane_if_pvm([sys.executable, "-m", "microvm", *sys.argv[1:]], what=f"`microvm bench {command}`",
                         out_dir=out, smp=smp)


def _kernel(kernel_format: str) -> Path:
    """Our cached kernel in that format; a ConfigError (one line) if none is built.
    Asked on the host too, before the lane: the lane sees the host's files."""
    from microvm.benchmarks.boot import kernel_path

    return kernel_path(kernel_format)


out_option = click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
                          default=DEFAULT_OUT, show_default=True, help="Directory for the result files.")
kernel_option = click.option("--kernel-format", type=click.Choice(["elf", "bzimage"]), default="elf",
                             show_default=True, help="Our cached kernel as vmlinux (elf) or bzImage.")


@click.group()
def bench() -> None:
    """Benchmarks: boot timeline, host memory footprint, VMs per second."""


@bench.command("boot")
@click.option("--kernel-format", "formats", default="elf", show_default=True, metavar="FORMAT[,FORMAT...]",
              callback=_choices(KERNEL_FORMATS), help="Comma-separated: elf (vmlinux, PVH), bzimage.")
@click.option("--mem", "mems", default="128", show_default=True, metavar="MIB[,MIB...]",
              callback=_ints(*MEM_MIB_RANGE), help="Guest MiB, comma-separated.")
@click.option("--vcpus", "vcpus", default="1", show_default=True, metavar="N[,N...]",
              callback=_ints(*VCPUS_RANGE), help="vCPU counts, comma-separated.")
@click.option("--cmdline-variant", "variants", default="quiet", show_default=True, metavar="VARIANT[,VARIANT...]",
              callback=_choices(CMDLINE_VARIANTS),
              help="Comma-separated: quiet (our default command line), verbose (without `quiet`).")
@click.option("-n", "--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Boots per configuration.")
@click.option("--qemu", "with_qemu", is_flag=True, help="Also boot QEMU's microvm machine, same kernel and initramfs.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Seconds allowed per boot.")
@out_option
@one_line_errors
def boot_cmd(formats: list[str], mems: list[int], vcpus: list[int], variants: list[str], runs: int,
             with_qemu: bool, timeout: float, out: Path) -> None:
    """Boot each configuration N times: phase timeline table, JSON, CSV, PNG."""
    from microvm.benchmarks import boot, qemu, report
    from microvm.benchmarks.plot import boot_figure, pyplot

    pyplot()  # matplotlib (the bench extra) is there, or one line saying so before anything boots
    configs = boot.configurations(formats, mems, vcpus, variants, with_qemu)
    if with_qemu and not qemu.available():
        raise click.BadParameter(f"{qemu.QEMU} is not installed", param_hint="'--qemu'")
    for kernel_format in formats:
        _kernel(kernel_format)
    _in_lane("boot", out)
    with report.progress("booting", len(configs) * runs) as advance:
        result = boot.run(configs, runs, timeout=timeout, on_run=advance)
    report.console().print(report.stats_table(f"boot timeline, {runs} runs each (ms since start)",
                                              result["summary"]))
    paths = [report.write_json(out / "boot.json", result), report.write_csv(out / "boot.csv", result["runs"]),
             boot_figure(out / "boot.png", result["summary"], result["runs"])]
    click.echo("wrote " + ", ".join(str(p) for p in paths))


def _tabulate(name: str, progress: str, total: int, measure: Callable[[Callable[[str], None]], dict[str, Any]],
              title: str, module: Any, out: Path) -> None:
    """Run measure(advance) under a progress bar, print module's table, write NAME.json."""
    from microvm.benchmarks import report

    with report.progress(progress, total) as advance:
        result = measure(advance)
    report.console().print(report.rows_table(title, module.COLUMNS, module.table_rows(result)))
    click.echo(f"wrote {report.write_json(out / f'{name}.json', result)}")


def _vm_options(count_help: str, min_count: int) -> Callable[[F], F]:
    """--kernel-format, --mem, --count and --out: what footprint and rate share."""
    options = (kernel_option,
               click.option("--mem", "mem_mib", type=click.IntRange(*MEM_MIB_RANGE), default=128, show_default=True,
                            help="Guest MiB per VM."),
               click.option("--count", type=click.IntRange(min=min_count), default=20, show_default=True,
                            help=count_help),
               out_option)

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@bench.command("footprint")
@_vm_options("VMs in one process.", min_count=2)
@click.option("--processes", type=click.IntRange(min=0), default=4, show_default=True,
              help="Processes with one VM each.")
@one_line_errors
def footprint_cmd(kernel_format: str, mem_mib: int, count: int, processes: int, out: Path) -> None:
    """Host memory of the VMM beyond guest pages (RSS, PSS): 1 VM, COUNT VMs, a process per VM."""
    _kernel(kernel_format)
    _in_lane("footprint", out)
    from microvm.benchmarks import footprint

    _tabulate("footprint", "booting idle VMs", count + processes,
              lambda advance: footprint.run(_kernel(kernel_format), mem_mib, count, processes, advance),
              f"VMM host memory, {mem_mib} MiB guests", footprint, out)


@bench.command("rate")
@_vm_options("VMs per mode.", min_count=1)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes for the parallel mode.")
@one_line_errors
def rate_cmd(kernel_format: str, mem_mib: int, count: int, workers: int, out: Path) -> None:
    """VMs created, run to completion (`true`) and torn down per second."""
    _kernel(kernel_format)
    _in_lane("rate", out, smp=workers)
    from microvm.benchmarks import rate

    _tabulate("rate", "VMs", count * (2 if workers > 1 else 1),
              lambda advance: rate.run(_kernel(kernel_format), mem_mib, count, workers, advance),
              f"VM rate, {mem_mib} MiB guests running `true`", rate, out)
