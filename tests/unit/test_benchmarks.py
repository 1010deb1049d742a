"""The benchmarks' pure-Python parts, on synthetic data: no KVM, no guest."""

from __future__ import annotations

import csv
import ctypes
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from microvm import lane
from microvm.benchmarks import (
    ab,
    blk,
    boot,
    call,
    exits,
    footprint,
    guest,
    net,
    qemu,
    rate,
    report,
    scripts,
    startup,
)
from microvm.benchmarks.plot import boot_figure
from microvm.benchmarks.workers import WorkerError, run_workers
from microvm.cli import main
from microvm.errors import ConfigError
from microvm.lane import rerun
from microvm.lane import run as lane_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

VERBOSE_CONSOLE = b"""\
[    0.000000] Linux version 6.1.176 (microvm@microvm) #1 SMP
[    0.000000] Command line: console=ttyS0 reboot=k panic=-1 8250.nr_uarts=1\r
[    0.412345] Freeing unused kernel image (initmem) memory: 668K
[    0.523456] Run /init as init process
[    0.900000] random: crng init done
microvm: something from init
"""


def test_percentile_interpolates_between_ranks() -> None:
    assert report.percentile([3.0], 90) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile(list(range(11)), 90) == pytest.approx(9.0)
    assert report.percentile([10.0, 0.0], 90) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_summarize_metrics_skips_missing_values() -> None:
    records = [{"a": 1.0, "b": None}, {"a": 3.0}, {"a": 2.0, "b": 5.0}]
    stats = report.summarize_metrics(records, ["a", "b", "c"])
    assert list(stats) == ["a", "b"]
    assert stats["a"] == report.Stats(n=3, median=2.0, p90=pytest.approx(2.8), min=1.0, max=3.0)
    assert stats["b"].n == 1 and stats["b"].median == 5.0


def test_printk_times_stop_at_init() -> None:
    assert boot.printk_times(VERBOSE_CONSOLE) == {"guest first printk": 0.0, "guest printk before init": 0.523456}
    assert boot.printk_times(b"") == {}
    # quiet: the only kernel line is the shutdown's, which is no boot time
    assert boot.printk_times(b"microvm-bench-mark\r\n[    1.722700] reboot: Restarting system\r\n") == {}
    assert boot.printk_times(b"no timestamps here\n") == {}


def test_printk_times_without_init_line_take_every_kernel_line() -> None:
    console = b"[    1.250000] a\r\nnoise\r\n[   12.500000] b\r\n"
    assert boot.printk_times(console) == {"guest first printk": 1.25, "guest printk before init": 12.5}


def test_configurations_are_the_cross_product() -> None:
    configs = boot.configurations(["elf", "bzimage"], [128, 256], [1], ["quiet", "verbose"], ["qemu"])
    assert len(configs) == 16
    assert configs[0].label == "microvm elf 128M 1cpu quiet"
    assert configs[-1].label == "qemu bzimage 256M 1cpu verbose"
    assert "quiet" in configs[0].cmdline().split() and "reboot=k" in configs[0].cmdline()
    assert "quiet" not in configs[-1].cmdline().split() and "reboot=t" in configs[-1].cmdline()


def test_configurations_put_microvm_first_and_always() -> None:
    configs = boot.configurations(["elf"], [128], [1], ["quiet"], ["qemu", "microvm run"])
    assert [c.vmm for c in configs] == ["microvm", "microvm run", "qemu"]
    assert {c.guest for c in configs} == {"elf 128M 1cpu quiet"}
    assert configs[1].label == "microvm run elf 128M 1cpu quiet" and "reboot=k" in configs[1].cmdline()


@pytest.mark.parametrize("formats,variants,vmms", [(["pe"], ["quiet"], ["microvm"]), (["elf"], ["loud"], ["microvm"]),
                                                   ([], ["quiet"], ["microvm"]), (["elf"], ["quiet"], ["kvmtool"])])
def test_configurations_refuse_unknown_choices(formats: list[str], variants: list[str], vmms: list[str]) -> None:
    with pytest.raises(ConfigError):
        boot.configurations(formats, [128], [1], variants, vmms)


def _synthetic_boot() -> dict:
    runs = []
    for label, scale in (("microvm elf 128M 1cpu quiet", 1.0), ("microvm bzimage 128M 1cpu quiet", 1.5)):
        for i in range(3):
            marks = dict(zip(boot.VMM_PHASES, [0.01, 0.02, 0.2, 0.21, 1.0, 1.05, 1.1, 1.12], strict=True))
            runs.append({"configuration": label, "run": i + 1, **{k: v * scale + i * 0.01 for k, v in marks.items()},
                         "guest first printk": 0.0})
    runs.append({"configuration": "qemu elf 128M 1cpu quiet", "run": 1, "command done": 0.9, "vm ended": 1.0})
    labels = dict.fromkeys(r["configuration"] for r in runs)
    summary = {lab: report.summarize_metrics([r for r in runs if r["configuration"] == lab], boot.METRICS)
               for lab in labels}
    return {"runs": runs, "summary": summary}


def test_phase_increments_stack_to_the_last_mark() -> None:
    summary = _synthetic_boot()["summary"]
    inc = boot.phase_increments(summary["microvm elf 128M 1cpu quiet"])
    assert [p for p, _ in inc] == list(boot.VMM_PHASES)
    assert sum(s for _, s in inc) == pytest.approx(summary["microvm elf 128M 1cpu quiet"]["vm ended"].median)
    assert [p for p, _ in boot.phase_increments(summary["qemu elf 128M 1cpu quiet"])] == ["command done", "vm ended"]


def test_stats_table_has_a_row_per_metric() -> None:
    data = _synthetic_boot()
    out = Console(record=True, width=200)
    out.print(report.stats_table("boot", data["summary"]))
    text = out.export_text()
    assert "microvm bzimage 128M 1cpu quiet" in text and "first vcpu entry" in text
    assert "1110.0" in text  # elf, command done: median of 1.1, 1.11, 1.12 s, in ms


def test_json_and_csv_hold_every_run(tmp_path) -> None:
    data = _synthetic_boot()
    report.write_json(tmp_path / "b.json", data)
    loaded = json.loads((tmp_path / "b.json").read_text())
    assert len(loaded["runs"]) == 7
    assert loaded["summary"]["microvm elf 128M 1cpu quiet"]["command done"]["median"] == pytest.approx(1.11)
    report.write_csv(tmp_path / "b.csv", data["runs"])
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert len(rows) == 7 and set(boot.VMM_PHASES) <= set(rows[0])
    assert rows[-1]["init reached"] == "" and float(rows[-1]["command done"]) == 0.9


def test_boot_figure_is_a_png(tmp_path) -> None:
    import matplotlib.image

    data = _synthetic_boot()
    path = boot_figure(tmp_path / "sub" / "boot.png", data["summary"], data["runs"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 500


def test_resident_bytes_counts_touched_pages() -> None:
    page = footprint.PAGE_SIZE
    with mmap.mmap(-1, 16 * page) as m:
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert footprint.resident_bytes(address, 16 * page) == 0
        for i in (0, 5, 15):
            m[i * page] = 1
        assert footprint.resident_bytes(address, 16 * page) == 3 * page
        assert footprint.resident_bytes(address + page, 4 * page) == 0
        usage = footprint.measure([(address, address + 16 * page)])
        assert usage.guest == 3 * page and usage.vmm_rss == usage.rss - 3 * page
    with pytest.raises(OSError):
        footprint.resident_bytes(page + 1, page)  # not page-aligned: EINVAL


def test_resident_split_tells_a_guests_own_pages_from_a_shared_images(tmp_path) -> None:
    """Private anonymous pages are the guest's; pages of a file mapped privately
    and not written (the kernel image) are shared, and counted once by measure()."""
    from microvm._kvm import Mapping

    page = footprint.PAGE_SIZE
    image = tmp_path / "image"
    image.write_bytes(b"k" * 4 * page)
    fd = os.open(image, os.O_RDONLY)
    guests = [Mapping(16 * page, thp=False) for _ in range(2)]
    try:
        for m in guests:
            m.map_file(0, 4 * page, fd, 0)
            view = memoryview(m)
            assert bytes(view[:4 * page]) == b"k" * 4 * page  # the image's pages, read: shared
            view[page] = 7  # copy-on-write: this page becomes the guest's own
            view[8 * page] = 1  # and an anonymous page
            view.release()
        splits = [footprint.resident_split(m.address, 16 * page) for m in guests]
        assert splits == [(2 * page, 3 * page)] * 2
        usage = footprint.measure([(m.address, m.address + 16 * page) for m in guests])
        assert usage.guest == 2 * 2 * page + 3 * page  # the shared pages once
        assert usage.guest_mapped == 2 * 2 * page + 2 * 3 * page  # as RSS counts them
        assert usage.vmm_rss == usage.rss - usage.guest_mapped and usage.vmm_pss == usage.pss - usage.guest
    finally:
        for m in guests:
            m.close()
        os.close(fd)


def test_footprint_rows_report_the_deltas() -> None:
    def u(rss: int, guest: int) -> dict[str, int]:
        return footprint.Usage(rss << 20, rss << 20, guest << 20).to_dict()

    result = {"count": 20, "processes": 1, "per_process": [u(60, 10)], "per_process_mean_vmm_rss": 50 << 20,
              "per_process_mean_vmm_pss": 50 << 20,
              "one_process": {"baseline": u(40, 0), "one": u(52, 10), "many": u(128, 200),
                              "first_vm_vmm_rss": 2 << 20, "first_vm_vmm_pss": 2 << 20,
                              "per_extra_vm_vmm_rss": 1 << 20, "per_extra_vm_vmm_pss": 1 << 20}}
    rows = footprint.table_rows(result)
    assert [r[0] for r in rows][:3] == ["one process, no VM (baseline)", "one process, 1 VM", "one process, 20 VMs"]
    assert rows[2][5] == -72.0  # 128 - 200: nonsense in, nonsense out, but the arithmetic holds
    assert rows[4][5] == 1.0 and rows[-1][5] == 50.0
    assert all(len(r) == len(footprint.COLUMNS) for r in rows)


def test_rate_shares_and_summary() -> None:
    assert rate.shares(20, 2) == [10, 10]
    assert rate.shares(5, 3) == [2, 2, 1]
    series = [{"start": 10.0, "end": 12.0, "durations": [1.0, 1.0]},
              {"start": 10.5, "end": 14.0, "durations": [1.5, 2.0]}]
    s = rate.summary("processes", 2, series)
    assert s["vms"] == 4 and s["seconds"] == 4.0 and s["vms_per_second"] == 1.0
    assert rate.table_rows({"results": [s]})[0][:5] == ["processes", 2, 4, 4.0, 1.0]


def _square(report_, x: int) -> int:
    report_("progress", f"squaring {x}")
    return x * x


def _fail(report_, x: int) -> int:
    raise RuntimeError(f"worker says no to {x}")


def test_run_workers_collects_results_and_errors() -> None:
    seen: list[str] = []
    assert run_workers(_square, [(2,), (3,)], on_progress=seen.append, timeout=120) == [4, 9]
    assert sorted(seen) == ["squaring 2", "squaring 3"]
    with pytest.raises(WorkerError, match="worker says no to 7"):
        run_workers(_fail, [(7,)], timeout=120)


# --- options are checked on the host, before any lane (issue defect 13) --------------

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_lane(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Starting the lane (or asking for it) fails the test; calls are recorded."""
    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise AssertionError("a lane was started")

    monkeypatch.setattr(lane, "rerun_in_lane_if_pvm", refuse)
    monkeypatch.setattr(rerun, "run_in_lane", refuse)
    return calls


BAD_BENCH_OPTIONS = [
    (["boot", "--runs", "0"], "--runs"),
    (["boot", "-n", "-3"], "--runs"),
    (["boot", "--mem", "0"], "--mem"),
    (["boot", "--mem", "128,-1"], "--mem"),
    (["boot", "--mem", "128,lots"], "--mem"),
    (["boot", "--mem", ","], "--mem"),
    (["boot", "--vcpus", "0"], "--vcpus"),
    (["boot", "--vcpus", "255"], "--vcpus"),
    (["boot", "--kernel-format", "pe"], "--kernel-format"),
    (["boot", "--kernel-format", "elf,PE"], "--kernel-format"),
    (["boot", "--kernel-format", ""], "--kernel-format"),
    (["boot", "--cmdline-variant", "quiet,loud"], "--cmdline-variant"),
    (["boot", "--timeout", "0"], "--timeout"),
    (["footprint", "--count", "0"], "--count"),
    (["footprint", "--count", "1"], "--count"),
    (["footprint", "--mem", "0"], "--mem"),
    (["footprint", "--processes", "-1"], "--processes"),
    (["footprint", "--kernel-format", "pe"], "--kernel-format"),
    (["rate", "--count", "0"], "--count"),
    (["rate", "--workers", "0"], "--workers"),
    (["rate", "--count", "0", "--workers", "0"], "--count"),
    (["rate", "--mem", "-128"], "--mem"),
    (["blk", "--runs", "0"], "--runs"),
    (["blk", "--runtime", "0"], "--runtime"),
    (["blk", "--size-mib", "0"], "--size-mib"),
    (["net", "--runs", "0"], "--runs"),
    (["net", "--runtime", "-1"], "--runtime"),
    (["exits", "--exits", "0"], "--exits"),
    (["exits", "--exits", str(2**32)], "--exits"),
    (["exits", "--runs", "0"], "--runs"),
    (["call", "--calls", "0"], "--calls"),
    (["call", "--rounds", "0"], "--rounds"),
    (["call", "--warmup", "-1"], "--warmup"),
    (["call", "--mem", "0"], "--mem"),
    (["call", "--image", "/no/such/image.ext4"], "--image"),
    (["call", "--venv", "/no/such/venv"], "--venv"),
]


@pytest.mark.parametrize("args,option", BAD_BENCH_OPTIONS, ids=[" ".join(a) for a, _ in BAD_BENCH_OPTIONS])
def test_bench_refuses_bad_options_before_any_lane(args: list[str], option: str, tmp_path: Path,
                                                   no_lane: list[Any]) -> None:
    out = tmp_path / "results" / "bench"
    result = CliRunner().invoke(main, ["bench", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output  # click's usage error
    assert result.stdout == ""
    assert option in result.stderr and "Invalid value" in result.stderr
    assert not no_lane
    assert not (tmp_path / "results").exists()


def test_bench_boot_without_qemu_or_kernel_fails_on_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              no_lane: list[Any]) -> None:
    out = tmp_path / "bench"
    monkeypatch.setattr(qemu, "available", lambda: False)
    result = CliRunner().invoke(main, ["bench", "boot", "--qemu", "--out", str(out)])
    assert result.exit_code == 2 and "--qemu" in result.stderr and "not installed" in result.stderr

    def no_kernel(kernel_format: str) -> Path:
        raise ConfigError("no guest kernel built yet: run `microvm kernel build`")

    monkeypatch.setattr(guest, "kernel_path", no_kernel)
    for command in ("boot", "footprint", "rate", "blk", "net", "call"):
        result = CliRunner().invoke(main, ["bench", command, "--out", str(out)])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == "microvm: error: no guest kernel built yet: run `microvm kernel build`\n"
    assert not no_lane and not out.exists()


def test_bench_good_options_reach_the_lane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lanes: list[tuple[list[str], dict[str, Any]]] = []

    def lane_stand_in(argv: list[str], **kwargs: Any) -> None:
        lanes.append((argv, kwargs))
        raise SystemExit(0)  # as the real one does after the lane's run

    monkeypatch.setattr(lane, "rerun_in_lane_if_pvm", lane_stand_in)
    monkeypatch.setattr(guest, "kernel_path", lambda kernel_format: Path(f"/k/{kernel_format}"))
    monkeypatch.setattr(ab, "kernel_and_image", lambda package: (Path("/k/elf"), Path(f"/i/{package}")))
    monkeypatch.setattr(net, "check_host", lambda: None)
    monkeypatch.setattr(qemu, "available", lambda: True)
    images: list[tuple[Any, Any]] = []
    monkeypatch.setattr(call, "agent_image", lambda image, venv: images.append((image, venv)) or "img")
    monkeypatch.setattr(sys, "argv", ["microvm", "bench", "..."])
    out = tmp_path / "bench"
    for args in (["boot", "--mem", "128,256,128", "--vcpus", "1,2", "--kernel-format", "elf,bzimage", "-n", "1"],
                 ["footprint", "--count", "2", "--processes", "0"], ["rate", "--count", "1", "--workers", "3"],
                 ["blk", "--runs", "1", "--runtime", "1", "--size-mib", "1"], ["net", "--runs", "1", "--no-qemu"],
                 ["call", "--calls", "3", "--warmup", "0", "--rounds", "1", "--image", __file__]):
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert [k["out_dir"] for _, k in lanes] == [out] * 6
    assert lanes[2][1]["smp"] == 3
    assert lanes[5][1]["smp"] == 2 and images == [(Path(__file__), None)]  # the image is made on the host
    assert lanes[0][0][1:] == ["-m", "microvm", "bench", "..."]  # this command line, again
    assert not out.exists()


def test_bench_blk_and_net_want_their_image_and_qemu_on_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                no_lane: list[Any]) -> None:
    from microvm import images

    monkeypatch.setattr(guest, "kernel_path", lambda kernel_format: Path(f"/k/{kernel_format}"))
    monkeypatch.setattr(images, "debian_image_path", lambda packages: tmp_path / "no-image.ext4")
    out = tmp_path / "bench"
    for command, package in (("blk", "fio"), ("net", "iperf3")):
        result = CliRunner().invoke(main, ["bench", command, "--out", str(out)])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == (f"microvm: error: no Debian image with {package}: "
                                 f"run `microvm image debian --package {package}`\n")
    (tmp_path / "no-image.ext4").touch()
    monkeypatch.setattr(qemu, "available", lambda: False)
    result = CliRunner().invoke(main, ["bench", "blk", "--out", str(out)])
    assert result.exit_code == 2 and "--qemu" in result.stderr and "not installed" in result.stderr
    monkeypatch.setattr(net, "HOST_TOOLS", ("no-such-tool-here",))
    result = CliRunner().invoke(main, ["bench", "net", "--no-qemu", "--out", str(out)])
    assert result.exit_code == 1 and "needs no-such-tool-here" in result.stderr
    assert not no_lane and not out.exists()


def test_bench_call_takes_one_image_source(tmp_path: Path, no_lane: list[Any]) -> None:
    image, venv = tmp_path / "python.ext4", tmp_path / "venv"
    image.touch()
    venv.mkdir()
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "call", "--image", str(image), "--venv", str(venv), "--out", str(out)])
    assert result.exit_code == 2 and "--venv" in result.stderr and "not both" in result.stderr
    assert not no_lane and not out.exists()


# --- bench/*.py: entry points to `microvm bench` -------------------------------------

def test_translate_maps_the_old_flags() -> None:
    assert scripts.translate("blk", ["--runs", "2", "--json", "/r/blk-1.json", "--no-qemu"]) == (
        ["--runs", "2", "--out", "/r", "--no-qemu"], ["--json /r/blk-1.json: the results go to /r/blk.json (--out)"])
    assert scripts.translate("exits", ["--json=x.json"])[0] == ["--out", "."]
    assert scripts.translate("boot", ["--kernel", "bzImage", "--runs=3", "--no-qemu"])[0] == [
        "--runs", "20", "--cli", "--qemu", "--kernel-format", "bzimage", "--runs=3", "--no-qemu"]
    assert scripts.translate("boot", ["--kernel=/my/vmlinux"])[0][-2:] == ["--kernel-format", "/my/vmlinux"]
    assert scripts.translate("net", ["--json"])[0] == ["--json"]  # no value: the command says what is wrong


def _script(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """bench/SCRIPT with args, a stand-in QEMU first on PATH: a lane starting would leave its mark."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    fake_qemu = fake_bin / lane_run.QEMU
    fake_qemu.write_text(f"#!/bin/sh\ntouch {tmp_path / 'qemu-ran'}\nexit 1\n")
    fake_qemu.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (rerun.IN_LANE_ENV, "PYTHONPATH")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)


BAD_SCRIPT_OPTIONS = [
    ("boot.py", ["--runs", "0"], "--runs"),
    ("boot.py", ["--runs", "many"], "--runs"),
    ("boot.py", ["--kernel", "/no/such/vmlinux"], "--kernel-format"),
    ("net.py", ["--runs", "0"], "--runs"),
    ("net.py", ["--runtime", "-1"], "--runtime"),
    ("blk.py", ["--runtime", "0"], "--runtime"),
    ("blk.py", ["--size-mib", "0"], "--size-mib"),
    ("exits.py", ["--exits", "0"], "--exits"),
    ("exits.py", ["--runs", "0"], "--runs"),
    ("call.py", ["--calls", "0"], "--calls"),
    ("startup.py", ["--runs", "0"], "--runs"),
]


@pytest.mark.parametrize("script,args,option", BAD_SCRIPT_OPTIONS,
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_SCRIPT_OPTIONS])
def test_bench_scripts_refuse_bad_options_before_any_lane(script: str, args: list[str], option: str,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _script(script, [*args, "--json", str(out / "r.json")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert f"'{option}'" in proc.stderr and "Invalid value" in proc.stderr
    assert "Usage: microvm bench " in proc.stderr
    assert not (tmp_path / "qemu-ran").exists() and list(out.iterdir()) == []


def test_bench_script_help_is_the_commands(tmp_path: Path) -> None:
    proc = _script("blk.py", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: microvm bench blk [OPTIONS]")
    assert "--size-mib" in proc.stdout and "--no-qemu" in proc.stdout


# --- the one QEMU runner, the A/B table ----------------------------------------------

def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """A stand-in qemu-system-x86_64 (a shell script) run by qemu.run; its argv lands in args.txt."""
    exe = tmp_path / "qemu"
    exe.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args.txt"}\n{body}\n')
    exe.chmod(0o755)
    monkeypatch.setattr(qemu, "QEMU", str(exe))
    return tmp_path / "args.txt"


def test_qemu_run_times_the_marker_and_the_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _fake_qemu(tmp_path, monkeypatch, f"printf 'boot\\r\\n'; sleep 0.2; printf '{qemu.MARK}\\r\\n'; "
                                             "sleep 0.2")
    r = qemu.run(Path("/k"), Path("/i"), mem_mib=64, vcpus=2, devices=["-device", "x"], timeout=30)
    assert r.marker_s is not None and 0.15 < r.marker_s < r.exit_s
    assert r.text() == f"boot\n{qemu.MARK}\n"
    argv = args.read_text().split()
    assert argv[argv.index("-m") + 1] == "64" and argv[argv.index("-smp") + 1] == "2" and argv[-2:] == ["-device", "x"]


def test_qemu_run_reports_failure_and_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_qemu(tmp_path, monkeypatch, "echo 'no such device' >&2; exit 1")
    with pytest.raises(qemu.QemuBenchError, match="QEMU failed \\(1\\): no such device"):
        qemu.run(Path("/k"), Path("/i"), timeout=30)
    _fake_qemu(tmp_path, monkeypatch, "echo booting; exec sleep 30")
    with pytest.raises(qemu.QemuBenchError, match="within 1 s; console tail:\nbooting"):
        qemu.run(Path("/k"), Path("/i"), timeout=1)


def test_qemu_initramfs_ends_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from microvm import guestinit

    commands: list[list[str]] = []
    monkeypatch.setattr(guestinit, "initramfs_for", lambda argv: commands.append(argv) or b"cpio")
    with qemu.initramfs("fio --x") as initrd:
        assert initrd.read_bytes() == b"cpio"
    assert not initrd.exists()
    assert commands[0][:2] == ["sh", "-c"] and commands[0][2].startswith("( fio --x\n) >/dev/console 2>&1; stty")
    assert commands[0][2].endswith("reboot -f")


def test_compare_summarizes_sides_and_ratios() -> None:
    result = report.compare({"microvm": {"a": [1.0, 3.0, 2.0], "b": [10.0]}, "qemu": {"a": [4.0], "b": []}},
                            ["a", "b"], [("microvm", "qemu"), ("microvm", "kvmtool")])
    assert result["runs"] == {"microvm": 3, "qemu": 1}
    assert result["ratio"] == {"microvm / qemu": {"a": 0.5, "b": None}}  # no kvmtool: no ratio to it
    assert list(result["summary"]["qemu"]) == ["a"]
    out = Console(record=True, width=200)
    out.print(report.compare_table("demo", {"a": ("metric a", "ms"), "b": ("metric b", "MB/s")}, result))
    text = out.export_text()
    assert "demo: median (min-max) of 3 microvm, 1 qemu runs, host" in text
    assert "microvm / qemu" in text and "2 (1-3)" in text and "0.50" in text
    assert "metric b" in text and "10 (10-10)" in text
    json.dumps(result, default=report._jsonable)


def test_alternate_takes_turns_and_keeps_failures_apart() -> None:
    calls: list[str] = []

    def side(name: str, fail_on: int = 0) -> Any:
        def run() -> ab.Metrics:
            calls.append(name)
            if len(calls) == fail_on:
                raise guest.RunFailed("fio crashed\nits output")
            return {"x": float(len(calls))}
        return run

    lines: list[str] = []
    records, failures = ab.alternate({"microvm": side("microvm"), "qemu": side("qemu", fail_on=2)}, 2, lines.append)
    assert calls == ["microvm", "qemu", "microvm", "qemu"]
    assert records == {"microvm": [{"x": 1.0}, {"x": 3.0}], "qemu": [{"x": 4.0}]}
    assert [(f.side, f.run, f.error) for f in failures] == [("qemu", 1, "fio crashed\nits output")]
    assert lines[1] == "qemu FAILED: fio crashed"
    result = ab.compared(records, failures, ["x"])
    assert result["ratio"]["microvm / qemu"]["x"] == 0.5 and result["failures"][0]["side"] == "qemu"
    with pytest.raises(guest.RunFailed, match="no run succeeded; the first failure: fio crashed"):
        ab.compared({"microvm": []}, failures, ["x"])


def test_blk_and_net_parse_their_guests_output() -> None:
    job = {"jobs": [{"read": {"bw_bytes": 5e6, "iops": 700}, "write": {"bw_bytes": 2e6, "iops": 2}}]}
    output = "\n".join(f"=={name}==\n{json.dumps(job, indent=2)}" for name in blk.JOBS)
    assert blk.parse(output) == {"seq_read_MBps": 5.0, "seq_write_MBps": 2.0, "rand_read_4k_iops": 700}
    with pytest.raises(guest.RunFailed, match="no output for seq_read_MBps"):
        blk.parse("fio: command not found")
    assert "--runtime=7" in blk.fio_script(7) and blk.fio_script(7).count("fio --name") == 3
    job["jobs"][0]["read"]["total_ios"] = 1000
    counted = "\n".join(f"=={name}_irqs== 100\n=={name}==\n{json.dumps(job, indent=2)}\n=={name}_irqs_after== 350"
                        for name in blk.JOBS)
    assert blk.parse(counted)["rand_read_4k_iops_irqs_per_io"] == 0.25  # the guest's interrupts per request
    irqs = subprocess.run(["sh", "-c", blk.fio_script(1).split("\n")[3] + "; v=virtio7; irqs < /dev/null"],
                          capture_output=True, text=True)
    assert irqs.returncode == 0  # the script's awk parses (its numbers need a guest's /proc/interrupts)
    iperf = json.dumps({"end": {"sum_received": {"bits_per_second": 1.5e9}}}, indent=2)
    output = f"==guest_to_host==\n{iperf}\n==host_to_guest==\n{iperf}\nrr_tps 1234.5\n"
    assert net.parse(output) == {"guest_to_host": 1500.0, "host_to_guest": 1500.0, "rr": 1234.5}
    with pytest.raises(guest.RunFailed, match="iperf3 guest_to_host: unable to connect"):
        net.parse('==guest_to_host==\n{\n  "error": "unable to connect"\n}')


def test_boot_comparison_lines_up_each_guest_configuration() -> None:
    configs = boot.configurations(["elf"], [128, 256], [1], ["quiet"], ["microvm run", "qemu"])
    records = []
    for c in configs:
        marks = {"microvm": {"command done": 0.1, "vm ended": 0.12}, "microvm run": {"vm ended": 0.5},
                 "qemu": {"command done": 0.2, "vm ended": 0.25}}[c.vmm]
        records.append({"configuration": c.label, **marks})
    result = boot.comparison(configs, records)
    assert result is not None and list(result["ratio"]) == ["microvm / qemu", "microvm run / qemu"]
    assert result["ratio"]["microvm / qemu"]["elf 256M 1cpu quiet: command done"] == pytest.approx(0.5)
    assert result["ratio"]["microvm run / qemu"]["elf 128M 1cpu quiet: vm ended"] == pytest.approx(2.0)
    assert result["ratio"]["microvm run / qemu"]["elf 128M 1cpu quiet: command done"] is None
    assert list(boot.compared_metrics(configs)) == [f"elf {m}M 1cpu quiet: {mark}" for m in (128, 256)
                                                    for mark in boot.COMPARED]
    assert boot.comparison(configs[:1], records[:1]) is None  # microvm alone: nothing to compare


def test_exits_c_source_ships_in_the_package(tmp_path: Path) -> None:
    from importlib import resources

    source = resources.files("microvm.benchmarks") / exits.C_SOURCE
    assert "KVM_RUN" in source.read_text()
    if exits.shutil.which("cc") or exits.shutil.which("gcc"):
        assert exits.build_c(tmp_path).stat().st_mode & 0o100


def test_option_limits_are_microvms() -> None:
    """The CLI refuses nothing MicroVM takes and takes nothing it refuses (just past each end)."""
    from microvm.benchmarks.options import MEM_MIB_RANGE, VCPUS_RANGE
    from microvm.machine import MicroVM

    for field, (low, high) in (("mem_mib", MEM_MIB_RANGE), ("vcpus", VCPUS_RANGE)):
        for value in (low - 1, high + 1):
            with pytest.raises(ConfigError, match=field):
                MicroVM(Path("/no/kernel"), **{field: value})
        MicroVM(Path("/no/kernel"), **{field: low})
        MicroVM(Path("/no/kernel"), **{field: high})


# --- bench call: percentiles, ratios, turns ------------------------------------------

def _call_samples() -> dict[str, dict[str, list[float]]]:
    ms = [i / 1e3 for i in range(1, 101)]  # 1..100 ms
    return {"microvm": {"call": ms, "exec": [2 * x for x in ms], "cold": [1.0, 3.0, 2.0]},
            "qemu": {"call": [2 * x for x in ms], "exec": [2 * x for x in ms], "cold": []}}


def test_call_summary_is_percentiles_in_ms() -> None:
    summary = call.summarize(_call_samples())
    assert summary["microvm"]["call_p50"] == pytest.approx(50.5)
    assert summary["microvm"]["call_p99"] == pytest.approx(99.01)
    assert summary["qemu"]["exec_p99"] == pytest.approx(198.02)
    assert summary["microvm"]["cold_p50"] == pytest.approx(2000.0)
    assert summary["qemu"]["cold_p50"] is None  # every cold round failed: no number, no ratio
    ratio = call.ratios(summary)["microvm / qemu"]
    assert ratio["call_p50"] == pytest.approx(0.5) and ratio["exec_p99"] == pytest.approx(1.0)
    assert ratio["cold_p50"] is None
    assert call.ratios({"microvm": summary["microvm"]}) == {}  # --no-qemu


def test_call_table_and_json() -> None:
    samples = _call_samples()
    summary = call.summarize(samples)
    result = {"calls": 100, "warmup": 5, "rounds": 3, "samples": samples, "summary_ms": summary,
              "ratio": call.ratios(summary)}
    out = Console(record=True, width=200)
    out.print(call.table(result))
    text = out.export_text()
    assert "sandbox call latency: 100 warm requests, 3 cold rounds per side, host" in text
    assert "no-op call(), p99" in text and "microvm / qemu" in text and "0.50" in text
    assert "create -> first call -> close, p50" in text and "2000.0" in text
    json.dumps(result)


class _FakeSession:
    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def call(self, fn: Any) -> None:
        assert fn is call.noop
        self.log.append(f"{self.name} call")

    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
        self.log.append(f"{self.name} exec")
        return subprocess.CompletedProcess(argv, 0 if argv == ["true"] else 1, b"", b"")


def test_call_warm_takes_turns_and_skips_the_warmup() -> None:
    log: list[str] = []
    steps: list[str] = []
    samples = call.warm({"microvm": _FakeSession("microvm", log), "qemu": _FakeSession("qemu", log)},
                        calls=3, warmup=1, advance=steps.append)
    assert log == ["microvm call", "qemu call",  # the warm-up
                   "microvm call", "qemu call", "qemu call", "microvm call", "microvm call", "qemu call",
                   "microvm exec", "qemu exec",
                   "microvm exec", "qemu exec", "qemu exec", "microvm exec", "microvm exec", "qemu exec"]
    assert {side: {k: len(v) for k, v in per.items()} for side, per in samples.items()} == {
        "microvm": {"call": 3, "exec": 3}, "qemu": {"call": 3, "exec": 3}}
    assert len(steps) == len(call.OPS) and steps[0].startswith("call: microvm p50 ")
    assert call.steps(rounds=5, with_qemu=True) == 2 + 2 + 10


def test_call_cold_closes_even_when_the_call_fails() -> None:
    closed: list[bool] = []

    class Side:
        def __init__(self, fail: bool):
            self.fail = fail

        def open(self) -> Any:
            if self.fail:
                raise guest.RunFailed("no agent")
            return _FakeSession("x", [])

        def close(self) -> None:
            closed.append(True)

    times = call.cold(lambda: Side(False))
    assert set(times) == {"cold", "create", "close"} and times["cold"] >= times["create"] + times["close"]
    with pytest.raises(guest.RunFailed):
        call.cold(lambda: Side(True))
    assert closed == [True, True]


def test_call_needs_vhost_vsock_outside_the_lane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from microvm.errors import LaneError
    from microvm.lane import modules

    monkeypatch.delenv(rerun.IN_LANE_ENV, raising=False)
    monkeypatch.setattr(call, "VHOST_VSOCK", tmp_path / "vhost-vsock")
    with pytest.raises(ConfigError, match="modprobe vhost_vsock"):
        call.vhost_vsock()
    with pytest.raises(LaneError, match="only inside the lane"):
        modules.load(["vhost_vsock"])
    (tmp_path / "vhost-vsock").touch()
    call.vhost_vsock()


def test_qemu_machine_runs_until_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _fake_qemu(tmp_path, monkeypatch, "printf 'agent ready\\r\\n'; exec sleep 30")
    machine = qemu.start(Path("/k"), Path("/i"), mem_mib=256, devices=qemu.root_drive(Path("/img")))
    try:
        assert machine.wait_for(b"agent ready", 10)
        assert machine.alive and machine.console_tail() == "agent ready\n"
        assert not machine.wait_for(b"never", 0.1)
        argv = args.read_text().split()
        assert argv[argv.index("-m") + 1] == "256"
        assert argv[-4:] == ["-drive", "id=root,file=/img,format=raw,if=none,readonly=on",
                             "-device", "virtio-blk-device,drive=root"]
    finally:
        machine.kill()
    assert not machine.alive
    machine.kill()  # again: nothing left to do
    _fake_qemu(tmp_path, monkeypatch, "echo 'no vhost' >&2; exit 1")
    with qemu.start(Path("/k"), Path("/i")) as failed:
        assert not failed.wait_for(b"agent ready", 30)  # QEMU ended: no waiting out the 30 s
        failed.proc.wait()
        assert "no agent (QEMU exited 1: no vhost)" in str(failed.failure("no agent"))


def test_virtqueue_bench_times_both_queues_on_every_shape(tmp_path: Path) -> None:
    from microvm.benchmarks import virtqueue

    result = virtqueue.run(chains=1000, runs=1)
    assert set(result["summary"]) == {"python", "cython"}
    for side in ("python", "cython"):
        assert set(result["summary"][side]) == set(virtqueue.SHAPES)
        assert all(st.median > 0 for st in result["summary"][side].values())
    assert set(result["ratio"]["python / cython"]) == set(virtqueue.SHAPES)
    out = CliRunner().invoke(main, ["bench", "virtqueue", "--chains", "1000", "--runs", "1", "--out", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "virtqueue.json").exists()
    bad = CliRunner().invoke(main, ["bench", "virtqueue", "--chains", "10"])
    assert bad.exit_code != 0 and "--chains" in bad.output


def test_initcalls_are_parsed_named_and_ranked() -> None:
    from microvm.benchmarks import initcalls

    dmesg = (b"[    0.100000] calling  0xffffffff81001000 @ 1\n"
             b"[    0.100100] initcall 0xffffffff81001000 returned 0 after 100 usecs\n"
             b"[    0.200000] initcall 0xffffffff81002010 returned -19 after 2500 usecs\n"
             b"[    0.300000] initcall some_named_fn+0x0/0x40 returned 0 after 7 usecs\n"
             b"[    0.400000] initcall 0xffffffff81009000 returned 0 after 30 usecs\n")
    runs = [initcalls.parse(dmesg), [("0xffffffff81001000", 300)]]
    assert runs[0][:2] == [("0xffffffff81001000", 100), ("0xffffffff81002010", 2500)]
    symbols = initcalls.Symbols([(0xffffffff81001000, 0x20, "first_init"), (0xffffffff81002000, 0x40, "slow_init"),
                                 (0xffffffff81008000, 0x10, "small_fn")])
    assert symbols.name("0xffffffff81002010") == "slow_init+0x10"
    assert symbols.name("0xffffffff81009000") == "0xffffffff81009000"  # past small_fn's end: unnamed
    assert symbols.name("some_named_fn+0x0/0x40") == "some_named_fn+0x0/0x40"
    rows = initcalls.slowest(runs, symbols, n=2)
    assert [(r["initcall"], r["median_us"], r["max_us"], r["runs"]) for r in rows] == [
        ("slow_init+0x10", 2500, 2500, 1), ("first_init", 200, 300, 2)]
    assert initcalls.total_us(runs[0]) == 2637


def test_initcall_addresses_name_our_kernels_functions() -> None:
    from microvm.benchmarks import initcalls
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        pytest.skip("no guest kernel built")
    symbols = initcalls.Symbols.of(art.vmlinux)
    probe = subprocess.run(["nm", str(art.vmlinux)], capture_output=True, text=True, check=True).stdout
    addr = next(int(line.split()[0], 16) for line in probe.splitlines() if line.endswith(" virtio_mmio_init"))
    assert symbols.name(f"{addr:#x}") == "virtio_mmio_init"
    # The one-pass lookup a timeout's report uses (hangreport.py) agrees, and leaves out what no function holds.
    from microvm.loader.symbols import functions_at

    assert functions_at(art.vmlinux, [addr, addr + 3, 0x1000]) == {
        addr: "virtio_mmio_init", addr + 3: symbols.at(addr + 3) or "?"}
    assert functions_at(art.vmlinux, [addr + 3])[addr + 3].startswith("virtio_mmio_init+0x3")


def test_symbols_come_from_an_elf64_file_only(tmp_path: Path) -> None:
    """loader/elf.py's raw reader: a bzImage (here: not ELF) is a LoaderError, an
    ELF without a symbol table names nothing."""
    from microvm.errors import LoaderError
    from microvm.loader.elf import symbol_tables
    from microvm.loader.symbols import functions_at

    not_elf = tmp_path / "bzImage"
    not_elf.write_bytes(b"MZ" + bytes(4094))
    with pytest.raises(LoaderError, match="not a little-endian ELF64"):
        functions_at(not_elf, [0x1000])
    stripped = tmp_path / "tiny.elf"
    stripped.write_bytes(startup.tiny_kernel())
    assert symbol_tables(stripped) == (b"", b"") and functions_at(stripped, [startup.ENTRY]) == {}


def test_the_startup_guest_is_a_pvh_elf_our_loader_takes() -> None:
    from microvm.loader import elf

    image = elf.parse(startup.tiny_kernel())
    assert image.entry == startup.ENTRY
    [segment] = image.segments
    assert segment.paddr == startup.ENTRY


def test_startup_reads_microvms_timeline_lines() -> None:
    stderr = "vm created              1.5 ms\nfirst vcpu entry       12.0 ms\nsome warning\n"
    assert startup.parse_timeline(stderr) == {"vm created": 1.5, "first vcpu entry": 12.0}
