"""`microvm bench ...`: boot, footprint, rate, blk, net, call, exits, virtqueue, restore.

Each command prints a table and writes its results under --out. On a PVM
host the commands that boot Linux first re-run themselves inside the
hardware-virtualization lane (microvm.lane), with --out shared so the files
come back; exits (a tiny guest) runs where it is. Every option is checked
here, on the host, before that: a bad value is a usage error (exit 2) at
once, and nothing is created under --out. What is missing on the host (a
kernel, an image, QEMU, a tool) is one line (exit 1), also before any lane.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import RenderableType
from rich.table import Table

from microvm.benchmarks.options import (
    CMDLINE_VARIANTS,
    EXITS_RANGE,
    KERNEL_FORMATS,
    MEM_MIB_RANGE,
    VCPUS_RANGE,
    choices,
    ints,
)
from microvm.clierrors import one_line_errors

F = TypeVar("F", bound=Callable[..., Any])
Measure = Callable[[Callable[[str], None]], dict[str, Any]]
DEFAULT_OUT = "build/bench"


def _in_lane(command: str, out: Path, smp: int | None = None, mem_mib: int = 2048) -> None:
    """On a PVM host: run this same command line in the lane, then exit.
    (bench/*.py set sys.argv to `microvm bench ...` first: see scripts.py.)"""
    from microvm.lane import rerun_in_lane_if_pvm

    rerun_in_lane_if_pvm([sys.executable, "-m", "microvm", *sys.argv[1:]], what=f"`microvm bench {command}`",
                         out_dir=out, smp=smp, mem_mib=mem_mib)


def _kernel(kernel_format: str) -> Path:
    """Our cached kernel in that format; a ConfigError (one line) if none is built."""
    from microvm.benchmarks import guest

    return guest.kernel_path(kernel_format)


def _need_qemu(with_qemu: bool) -> None:
    from microvm.benchmarks import qemu

    if with_qemu and not qemu.available():
        raise click.BadParameter(f"{qemu.QEMU} is not installed", param_hint="'--qemu'")


def _options(*options: Callable[[Any], Any]) -> Callable[[F], F]:
    """Several click options as one decorator, in the order given."""

    def apply(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _qemu_option(default: bool, help: str) -> Callable[[F], F]:
    return click.option("--qemu/--no-qemu", "with_qemu", default=default, show_default=True, help=help)


out_option = click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
                          default=DEFAULT_OUT, show_default=True, help="Directory for the result files.")
kernel_option = click.option("--kernel-format", type=click.Choice(KERNEL_FORMATS), default="elf",
                             show_default=True, help="Our cached kernel as vmlinux (elf) or bzImage.")


def _measure(name: str, progress: str, total: int, measure: Measure,
             table: Callable[[dict[str, Any]], RenderableType], out: Path) -> None:
    """Run measure(advance) under a progress bar, print its table and the
    runs that failed (stderr), write NAME.json."""
    from microvm.benchmarks import report

    with report.progress(progress, total) as advance:
        result = measure(advance)
    report.console().print(table(result))
    for f in result.get("failures", []):
        click.echo(f"run {f['run']} {f['side']} failed after {f['seconds']:.0f} s: {f['error']}", err=True)
    click.echo(f"wrote {report.write_json(out / f'{name}.json', result)}")


def _compared(module: Any) -> Callable[[dict[str, Any]], Table]:
    """The table of an A/B benchmark module (METRICS, title(result))."""
    from microvm.benchmarks import report

    return lambda result: report.compare_table(module.title(result), module.METRICS, result)


@click.group()
def bench() -> None:
    """Benchmarks: boot timeline, footprint, VM rate; virtio-blk, virtio-net, sandbox calls, exit cost, restore,
    VMM start-up."""


@bench.command("boot")
@click.option("--kernel-format", "formats", default="elf", show_default=True, metavar="FORMAT[,FORMAT...]",
              callback=choices(KERNEL_FORMATS), help="Comma-separated: elf (vmlinux, PVH), bzimage.")
@click.option("--mem", "mems", default="128", show_default=True, metavar="MIB[,MIB...]",
              callback=ints(*MEM_MIB_RANGE), help="Guest MiB, comma-separated.")
@click.option("--vcpus", "vcpus", default="1", show_default=True, metavar="N[,N...]",
              callback=ints(*VCPUS_RANGE), help="vCPU counts, comma-separated.")
@click.option("--cmdline-variant", "variants", default="quiet", show_default=True, metavar="VARIANT[,VARIANT...]",
              callback=choices(CMDLINE_VARIANTS),
              help="Comma-separated: quiet (our default command line), verbose (without `quiet`), "
                   "full-log (quiet, and every kernel message collected at the end: MicroVM(full_log=True)), "
                   "jail (quiet, the VMM jailed: MicroVM(jail=True)); QEMU boots quiet for the last two.")
@click.option("-n", "--runs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Boots per configuration.")
@_qemu_option(False, "Also boot QEMU's microvm machine, same kernel and initramfs.")
@click.option("--cli", "with_cli", is_flag=True, help="Also time `microvm run -- true`, a whole process.")
@click.option("--initcalls", "with_initcalls", is_flag=True,
              help="Also list the slowest initcalls (initcall_debug; microvm's boots then run `dmesg`).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300, show_default=True,
              help="Seconds allowed per boot.")
@out_option
@one_line_errors
def boot_cmd(formats: list[str], mems: list[int], vcpus: list[int], variants: list[str], runs: int,
             with_qemu: bool, with_cli: bool, with_initcalls: bool, timeout: float, out: Path) -> None:
    """Boot each configuration N times: phase timeline table, JSON, CSV, PNG."""
    from microvm.benchmarks import boot, report
    from microvm.benchmarks.plot import boot_figure, pyplot

    pyplot()  # matplotlib (the bench extra) is there, or one line saying so before anything boots
    vmms = ["microvm", *(["microvm run"] if with_cli else []), *(["qemu"] if with_qemu else [])]
    configs = boot.configurations(formats, mems, vcpus, variants, vmms)
    _need_qemu(with_qemu)
    for kernel_format in formats:
        _kernel(kernel_format)
    _in_lane("boot", out)
    with report.progress("booting", len(configs) * runs) as advance:
        result = boot.run(configs, runs, timeout=timeout, on_run=advance, with_initcalls=with_initcalls)
    report.console().print(report.stats_table(f"boot timeline, {runs} runs each (ms since start)",
                                              result["summary"]))
    if with_initcalls:
        from microvm.benchmarks import initcalls

        report.console().print(report.rows_table(
            f"slowest initcalls (initcall_debug), median of {runs} runs",
            ["configuration", "initcall", "median ms", "max ms", "runs"], initcalls.table_rows(result["initcalls"])))
    if result["comparison"] is not None:
        report.console().print(report.compare_table("boot, ms from start() (microvm) or from spawning the process",
                                                    boot.compared_metrics(configs), result["comparison"]))
    paths = [report.write_json(out / "boot.json", result), report.write_csv(out / "boot.csv", result["runs"]),
             boot_figure(out / "boot.png", result["summary"], result["runs"])]
    click.echo("wrote " + ", ".join(str(p) for p in paths))


def _vm_options(count_help: str, min_count: int) -> Callable[[F], F]:
    """--kernel-format, --mem, --count and --out: what footprint and rate share."""
    return _options(kernel_option,
                    click.option("--mem", "mem_mib", type=click.IntRange(*MEM_MIB_RANGE), default=128,
                                 show_default=True, help="Guest MiB per VM."),
                    click.option("--count", type=click.IntRange(min=min_count), default=20, show_default=True,
                                 help=count_help),
                    out_option)


def _rows(title: str, module: Any) -> Callable[[dict[str, Any]], Table]:
    """The table of a module with COLUMNS and table_rows(result)."""
    from microvm.benchmarks import report

    return lambda result: report.rows_table(title, module.COLUMNS, module.table_rows(result))


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

    _measure("footprint", "booting idle VMs", count + processes,
             lambda advance: footprint.run(_kernel(kernel_format), mem_mib, count, processes, advance),
             _rows(f"VMM host memory, {mem_mib} MiB guests", footprint), out)


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

    _measure("rate", "VMs", count * (2 if workers > 1 else 1),
             lambda advance: rate.run(_kernel(kernel_format), mem_mib, count, workers, advance),
             _rows(f"VM rate, {mem_mib} MiB guests running `true`", rate), out)


def _ab_options(runtime_help: str, *own: Callable[[Any], Any]) -> Callable[[F], F]:
    """--runtime, --runs, the command's own, --qemu/--no-qemu and --out: what blk and net share."""
    return _options(click.option("--runtime", type=click.IntRange(min=1), default=5, show_default=True,
                                 help=runtime_help),
                    click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True,
                                 help="Runs per VMM, taking turns."),
                    *own,
                    _qemu_option(True, "Also run QEMU's microvm machine, same kernel, image and script."),
                    out_option)


@bench.command("blk")
@_ab_options("Seconds per fio job.",
             click.option("--size-mib", type=click.IntRange(min=1), default=256, show_default=True,
                          help="Scratch disk size (on a host tmpfs)."))
@one_line_errors
def blk_cmd(runtime: int, runs: int, with_qemu: bool, out: Path, size_mib: int) -> None:
    """virtio-blk: fio sequential and random I/O, microvm against QEMU."""
    from microvm.benchmarks import ab, blk

    ab.kernel_and_image(blk.PACKAGE)
    _need_qemu(with_qemu)
    _in_lane("blk", out)
    _measure("blk", "fio runs", runs * (1 + with_qemu),
             lambda advance: blk.run(runs, runtime, size_mib, with_qemu, advance), _compared(blk), out)


@bench.command("net")
@_ab_options("Seconds per measurement.")
@one_line_errors
def net_cmd(runtime: int, runs: int, with_qemu: bool, out: Path) -> None:
    """virtio-net over a tap: TCP both ways and request/response, microvm against QEMU."""
    from microvm.benchmarks import ab, net

    ab.kernel_and_image(net.PACKAGE)
    net.check_host()
    _need_qemu(with_qemu)
    _in_lane("net", out)
    _measure("net", "network runs", runs * (1 + with_qemu),
             lambda advance: net.run(runs, runtime, with_qemu, advance), _compared(net), out)


@bench.command("call")
@click.option("--calls", type=click.IntRange(min=1), default=200, show_default=True,
              help="Warm no-op calls, and as many `exec true`, per side.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Calls and commands per side before those, not counted.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Create -> first call -> close, per side.")
@click.option("--mem", "mem_mib", type=click.IntRange(*MEM_MIB_RANGE), default=256, show_default=True,
              help="Guest MiB.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Python root image (.ext4 or its .json) from `microvm image python`.")
@click.option("--venv", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Build (once) the image from this venv (default: a venv of the agent's packages).")
@_qemu_option(True, "Also run the agent in QEMU's microvm machine, same kernel and image, with vhost-vsock.")
@out_option
@one_line_errors
def call_cmd(calls: int, warmup: int, rounds: int, mem_mib: int, image: Path | None, venv: Path | None,
             with_qemu: bool, out: Path) -> None:
    """Sandbox call latency: a no-op call and `exec true` (p50, p99) and create -> call -> close, against QEMU."""
    from microvm.benchmarks import call

    if image is not None and venv is not None:
        raise click.BadParameter("give --image or --venv, not both", param_hint="'--venv'")
    kernel = _kernel("elf")
    _need_qemu(with_qemu)
    agent_image = call.agent_image(image, venv)  # built (once) here: the lane sees the host's cache
    # Two lane CPUs: the VMM's threads and the host's client run beside the guest's vCPU. (That is
    # multi-threaded TCG, where a rare guest triple fault was seen: see tests/boot/conftest.py.)
    _in_lane("call", out, smp=2)
    _measure("call", "sandbox calls", call.steps(rounds, with_qemu),
             lambda advance: call.run(kernel, agent_image, calls=calls, warmup=warmup, rounds=rounds,
                                      mem_mib=mem_mib, with_qemu=with_qemu, advance=advance), call.table, out)


@bench.command("exits")
@click.option("--exits", type=click.IntRange(*EXITS_RANGE), default=20000, show_default=True,
              help="Port-I/O exits per run (the guest's loop count).")
@click.option("--runs", type=click.IntRange(min=1), default=7, show_default=True, help="Runs per variant.")
@out_option
@one_line_errors
def exits_cmd(exits: int, runs: int, out: Path) -> None:
    """Cost of one port-I/O exit: our bus, a no-op device, a bare Python loop, a C loop."""
    from microvm.benchmarks import exits as exits_bench

    exits_bench.compiler()
    _measure("exits", "exit loops", runs * len(exits_bench.VARIANTS),
             lambda advance: exits_bench.run(exits, runs, advance), exits_bench.table, out)


@bench.command("startup")
@click.option("--runs", type=click.IntRange(min=1), default=7, show_default=True, help="Runs per variant.")
@out_option
@one_line_errors
def startup_cmd(runs: int, out: Path) -> None:
    """Start-up of the VMM, like with like: microvm and QEMU booting a tiny PVH guest that ends at once."""
    from microvm.benchmarks import startup

    _in_lane("startup", out)
    _measure("startup", "start-ups", runs * len(startup.VARIANTS),
             lambda advance: startup.run(runs, advance), _compared(startup), out)


@bench.command("virtqueue")
@click.option("--chains", type=click.IntRange(min=1000), default=100_000, show_default=True,
              help="Chains through the queue per run.")
@click.option("--runs", type=click.IntRange(min=1), default=7, show_default=True, help="Runs per variant.")
@out_option
@one_line_errors
def virtqueue_cmd(chains: int, runs: int, out: Path) -> None:
    """Cost of a virtqueue request, device side: the Python queue against the Cython one (no VM)."""
    from microvm.benchmarks import virtqueue

    _measure("virtqueue", "queue runs", runs * len(virtqueue.SHAPES) * len(virtqueue.VARIANTS),
             lambda advance: virtqueue.run(chains, runs, advance), _compared(virtqueue), out)


@bench.command("restore")
@click.option("--mem", "mem_mib", type=click.IntRange(*MEM_MIB_RANGE), default=None,
              help="Guest MiB.  [default: 128, with --sandbox 256]")
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Restores and forks (each way) of the tiny guest to its first exit.")
@click.option("--sandbox", is_flag=True,
              help="Instead: Linux sandboxes in the lane, cold boot, restore, restore with prefetch and fork to "
                   "the first call, against QEMU's own restore from a file; memory of 1, 10 and 50 forks.")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="With --sandbox: first calls per side.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --sandbox: a Python root image (.ext4 or its .json) from `microvm image python`.")
@_qemu_option(True, "With --sandbox: also QEMU microvm's restore (-incoming from its migration to a file).")
@out_option
@one_line_errors
def restore_cmd(mem_mib: int | None, runs: int, sandbox: bool, rounds: int, image: Path | None, with_qemu: bool,
                out: Path) -> None:
    """Snapshot, restore and fork to the first exit (tiny guest) or the first call (--sandbox)."""
    from rich.console import Group

    if not sandbox:
        from microvm.benchmarks import restore

        _measure("restore", "restores and forks", restore.steps(runs),
                 lambda advance: restore.run(mem_mib or 128, runs, advance), lambda r: Group(*restore.tables(r)), out)
        return
    from microvm.benchmarks import call, sandbox_restore

    kernel = _kernel("elf")
    _need_qemu(with_qemu)
    agent_image = call.agent_image(image, None)  # built (once) here: the lane sees the host's cache
    _in_lane("restore", out, mem_mib=6144)  # the template, a restore or two, 50 forks
    _measure("restore-sandbox", "first calls", sandbox_restore.steps(rounds, with_qemu),
             lambda advance: sandbox_restore.run(kernel, agent_image, rounds=rounds, mem_mib=mem_mib or 256,
                                                 with_qemu=with_qemu, advance=advance),
             lambda r: Group(*sandbox_restore.tables(r)), out)
