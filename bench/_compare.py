"""Shared by the device benchmarks that put microvm next to QEMU's microvm
machine (same kernel, same Debian root image, same guest command): finding
those, running QEMU's side, alternating runs, and the table of medians with
the ratio microvm / QEMU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from microvm.benchmarks import qemu as qemu_bench
from microvm.benchmarks.options import int_range, output_file
from microvm.benchmarks.report import console, rows_table, summarize

Metrics = dict[str, float]
# The end of QEMU's guest (bench/blk.py has the same). stty drains the serial
# port first (TCSADRAIN), since a reboot does not wait for it; reboot is
# busybox's from our initramfs (/proc/1/root), the Debian root has none.
QEMU_END = "stty -F /dev/console -opost; /proc/1/root/bin/busybox reboot -f"


def kernel_and_image(package: str, script: str) -> tuple[Path, Path]:
    """Our default kernel (vmlinux) and the Debian root image with package,
    or exit telling the user how to make them."""
    from microvm.images import DEBIAN_PACKAGES, debian_image_path
    from microvm.kernelbuild import find_default_kernel

    image = debian_image_path((*DEBIAN_PACKAGES, package))
    art = find_default_kernel()
    if not image.exists() or art is None:
        sys.exit(f"{script}: needs `microvm kernel build` and `microvm image debian --package {package}`")
    return art.vmlinux, image


def qemu_console(kernel: Path, script: str, *, append: str, devices: Sequence[str], mem_mib: int,
                 timeout: float) -> str:
    """Run script (sh) in QEMU's microvm machine booting kernel with our init;
    its output, as the serial console shows it (LF line ends)."""
    from microvm.guestinit import initramfs_for

    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp, "initrd")
        # No control device or virtio-console under QEMU: the output is on
        # ttyS0, and the script ends the machine itself, failed or not (our
        # init would wait forever for the host); the guest's reboot (reboot=t)
        # ends QEMU (-no-reboot).
        initrd.write_bytes(initramfs_for(["sh", "-c", f"( {script}\n) >/dev/console 2>&1; {QEMU_END}"]))
        argv = [qemu_bench.QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-smp", "1",
                "-m", str(mem_mib), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"{qemu_bench.CMDLINE} {append}", *devices]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            tail = (out if isinstance(out, str) else out.decode(errors="replace"))[-3000:]
            raise RuntimeError(f"QEMU did not finish within {timeout:.0f} s; console tail:\n{tail}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"QEMU failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.replace("\r\n", "\n")


def alternate(sides: Mapping[str, Callable[[], Metrics]], runs: int) -> dict[str, list[Metrics]]:
    """runs of each side, taking turns (so drifts in the host's load hit all
    of them), a line of progress per run; side -> one record per run that
    succeeded (a failed run, RuntimeError, is reported and left out)."""
    import time

    records: dict[str, list[Metrics]] = {who: [] for who in sides}
    for i in range(runs):
        for who, run in sides.items():
            t0 = time.monotonic()
            try:
                got = run()
            except RuntimeError as e:
                print(f"run {i + 1}/{runs} {who} FAILED after {time.monotonic() - t0:.0f} s: {e}", flush=True)
                continue
            records[who].append(got)
            print(f"run {i + 1}/{runs} {who} ({time.monotonic() - t0:.0f} s): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in got.items()), flush=True)
    return {who: recs for who, recs in records.items() if recs}


def report(title: str, metrics: Mapping[str, tuple[str, str]], records: Mapping[str, list[Metrics]],
           json_path: Path | None = None, **facts: object) -> None:
    """The table: per metric (name -> (label, unit)) each side's median
    (min-max) and the ratio of medians microvm / qemu; then the JSON with the
    raw samples, the summaries, the ratios and facts."""
    if not records:
        sys.exit("no run succeeded")
    samples = {who: {k: [rec[k] for rec in recs] for k in metrics} for who, recs in records.items()}
    stats = {who: {k: summarize(v) for k, v in per.items()} for who, per in samples.items()}
    both = {"microvm", "qemu"} <= stats.keys()
    ratio = {k: stats["microvm"][k].median / stats["qemu"][k].median if both else None for k in metrics}
    rows = []
    for k, (label, unit) in metrics.items():
        cells = [f"{st.median:.4g} ({st.min:.4g}-{st.max:.4g})" for st in (stats[who][k] for who in records)]
        rows.append([label, unit, *cells, ratio[k]])
    where = "lane" if os.environ.get("MICROVM_IN_LANE") == "1" else "host"
    runs = {who: len(recs) for who, recs in records.items()}
    console().print(rows_table(f"{title}: median (min-max) of " + ", ".join(f"{n} {who}" for who, n in runs.items())
                               + f" runs, {where}", ["metric", "unit", *records, "microvm / qemu"], rows))
    if json_path:
        summary = {who: {k: st.to_dict() for k, st in per.items()} for who, per in stats.items()}
        json_path.write_text(json.dumps({"runs": runs, **facts, "samples": samples, "summary": summary,
                                         "ratio": ratio}, indent=2))


T = TypeVar("T")


def ab_parser(description: str | None, runtime_help: str) -> argparse.ArgumentParser:
    """The options every A/B benchmark takes: --runtime, --runs, --no-qemu, --json.
    Their types check the values while parsing: on the host, before any lane."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int_range(1), default=5, help=f"{runtime_help} (default 5)")
    ap.add_argument("--runs", type=int_range(1), default=5, help="runs per VMM, taking turns (default 5)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", type=output_file, help="write the samples and summary here too")
    return ap


def sides(args: argparse.Namespace, ours: T, qemu: T) -> dict[str, T]:
    """microvm, and QEMU unless --no-qemu or it is not installed."""
    return {"microvm": ours} | ({"qemu": qemu} if not args.no_qemu and qemu_bench.available() else {})

