"""The benchmarks' pure-Python parts, on synthetic data: no KVM, no guest."""

from __future__ import annotations

import csv
import ctypes
import json
import mmap

import pytest
from rich.console import Console

from microvm.benchmarks import boot, footprint, rate, report
from microvm.benchmarks.plot import boot_figure
from microvm.benchmarks.workers import WorkerError, run_workers
from microvm.errors import ConfigError

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
    configs = boot.configurations(["elf", "bzimage"], [128, 256], [1], ["quiet", "verbose"], with_qemu=True)
    assert len(configs) == 16
    assert configs[0].label == "microvm elf 128M 1cpu quiet"
    assert configs[-1].label == "qemu bzimage 256M 1cpu verbose"
    assert "quiet" in configs[0].cmdline().split() and "reboot=k" in configs[0].cmdline()
    assert "quiet" not in configs[-1].cmdline().split() and "reboot=t" in configs[-1].cmdline()


@pytest.mark.parametrize("formats,variants", [(["pe"], ["quiet"]), (["elf"], ["loud"]), ([], ["quiet"])])
def test_configurations_refuse_unknown_choices(formats: list[str], variants: list[str]) -> None:
    with pytest.raises(ConfigError):
        boot.configurations(formats, [128], [1], variants)


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
