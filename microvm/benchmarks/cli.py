"""`microvm bench ...`: boot, footprint, rate.

Each command prints a table and writes its results under --out. On a PVM
host it first re-runs itself inside the hardware-virtualization lane (lane.py),
with --out shared so the files come back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_OUT = "build/bench"


def _errors(fn: F) -> F:
    """microvm.cli's one-line errors, looked up when called (that module imports this one)."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from microvm.cli import _one_line_errors

        return _one_line_errors(fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _words(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    return [w.strip() for w in value.split(",") if w.strip()]


def _ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        return [int(w) for w in _words(ctx, param, value)]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers") from None


def _in_lane(command: str, out: Path, smp: int | None = None) -> None:
    """On a PVM host: run this same command line in the lane, then exit."""
    from microvm.benchmarks.lane import rerun_in_lane_if_pvm

    rerun_in_lane_if_pvm([sys.executable, "-m", "microvm", *sys.argv[1:]], what=f"`microvm bench {command}`",
                         out_dir=out, smp=smp)


def _kernel(kernel_format: str) -> Path:
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
@click.option("--kernel-format", "formats", default="elf", show_default=True, callback=_words,
              help="Comma-separated: elf (vmlinux, PVH), bzimage.")
@click.option("--mem", "mems", default="128", show_default=True, callback=_ints, help="Guest MiB, comma-separated.")
@click.option("--vcpus", "vcpus", default="1", show_default=True, callback=_ints, help="vCPU counts, comma-separated.")
@click.option("--cmdline-variant", "variants", default="quiet", show_default=True, callback=_words,
              help="Comma-separated: quiet (our default command line), verbose (without `quiet`).")
@click.option("-n", "--runs", type=int, default=10, show_default=True, help="Boots per configuration.")
@click.option("--qemu", "with_qemu", is_flag=True, help="Also boot QEMU's microvm machine, same kernel and initramfs.")
@click.option("--timeout", type=float, default=300, show_default=True, help="Seconds allowed per boot.")
@out_option
@_errors
def boot_cmd(formats: list[str], mems: list[int], vcpus: list[int], variants: list[str], runs: int,
             with_qemu: bool, timeout: float, out: Path) -> None:
    """Boot each configuration N times: phase timeline table, JSON, CSV, PNG."""
    from microvm.benchmarks import boot, report

    configs = boot.configurations(formats, mems, vcpus, variants, with_qemu)  # bad options fail here, not in the lane
    _in_lane("boot", out)
    from microvm.benchmarks.plot import boot_figure

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


def _vm_options(count_help: str) -> Callable[[F], F]:
    """--kernel-format, --mem, --count and --out: what footprint and rate share."""
    options = (kernel_option, click.option("--mem", "mem_mib", type=int, default=128, show_default=True,
                                           help="Guest MiB per VM."),
               click.option("--count", type=int, default=20, show_default=True, help=count_help), out_option)

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@bench.command("footprint")
@_vm_options("VMs in one process.")
@click.option("--processes", type=int, default=4, show_default=True, help="Processes with one VM each.")
@_errors
def footprint_cmd(kernel_format: str, mem_mib: int, count: int, processes: int, out: Path) -> None:
    """Host memory of the VMM beyond guest pages (RSS, PSS): 1 VM, COUNT VMs, a process per VM."""
    _in_lane("footprint", out)
    from microvm.benchmarks import footprint

    _tabulate("footprint", "booting idle VMs", count + processes,
              lambda advance: footprint.run(_kernel(kernel_format), mem_mib, count, processes, advance),
              f"VMM host memory, {mem_mib} MiB guests", footprint, out)


@bench.command("rate")
@_vm_options("VMs per mode.")
@click.option("--workers", type=int, default=2, show_default=True, help="Processes for the parallel mode.")
@_errors
def rate_cmd(kernel_format: str, mem_mib: int, count: int, workers: int, out: Path) -> None:
    """VMs created, run to completion (`true`) and torn down per second."""
    _in_lane("rate", out, smp=max(workers, 1))
    from microvm.benchmarks import rate

    _tabulate("rate", "VMs", count * (2 if workers > 1 else 1),
              lambda advance: rate.run(_kernel(kernel_format), mem_mib, count, workers, advance),
              f"VM rate, {mem_mib} MiB guests running `true`", rate, out)
