"""`microvm bench` end to end, kept short: one boot configuration, tiny guests."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from microvm.benchmarks.boot import PRINTK_METRICS, VMM_PHASES
from microvm.cli import main
from microvm.kernelbuild import find_default_kernel


@pytest.fixture(autouse=True)
def _kernel_built() -> None:
    if find_default_kernel() is None:
        pytest.fail("no guest kernel built: run `microvm kernel build`")


def test_bench_boot_table_json_png(tmp_path) -> None:
    import matplotlib.image

    r = CliRunner().invoke(main, ["bench", "boot", "-n", "3", "--mem", "64", "--cmdline-variant", "verbose",
                                  "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "boot timeline" in r.stdout and "microvm elf 64M 1cpu verbose" in r.stdout
    assert "first vcpu entry" in r.stdout and "guest printk before init" in r.stdout
    data = json.loads((tmp_path / "boot.json").read_text())
    assert len(data["runs"]) == 3
    for run in data["runs"]:
        assert all(phase in run for phase in (*VMM_PHASES, *PRINTK_METRICS)), run
        marks = [run[p] for p in VMM_PHASES]
        assert marks == sorted(marks)
    assert (tmp_path / "boot.csv").read_text().count("\n") == 4
    png = tmp_path / "boot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[2] in (3, 4)


def test_bench_footprint_one_and_twenty_vms(tmp_path) -> None:
    r = CliRunner().invoke(main, ["bench", "footprint", "--mem", "32", "--count", "20", "--processes", "1",
                                  "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "one process, 1 VM" in r.stdout and "one process, 20 VMs" in r.stdout
    data = json.loads((tmp_path / "footprint.json").read_text())
    own = data["one_process"]
    assert own["one"]["guest"] > 1 << 20  # the kernel and initramfs at least
    assert own["many"]["guest"] > 15 * own["one"]["guest"]
    assert own["baseline"]["vmm_rss"] > 10 << 20  # the interpreter and its imports
    # A VM's own host memory is small next to the guest's: within noise for the
    # first one, a few MiB at most each.
    assert -(4 << 20) < own["first_vm_vmm_rss"] < 32 << 20
    assert 0 < own["per_extra_vm_vmm_rss"] < 32 << 20
    assert len(data["per_process"]) == 1 and data["per_process"][0]["vmm_pss"] > 0


def test_bench_blk_microvm_side(tmp_path) -> None:
    from microvm.images import DEBIAN_PACKAGES, debian_image_path

    if not debian_image_path((*DEBIAN_PACKAGES, "fio")).exists():
        pytest.skip("no Debian image with fio: run `microvm image debian --package fio`")
    r = CliRunner().invoke(main, ["bench", "blk", "--runs", "1", "--runtime", "1", "--size-mib", "16", "--no-qemu",
                                  "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "sequential read, 1 MiB" in r.stdout and "random read, 4 KiB" in r.stdout
    data = json.loads((tmp_path / "blk.json").read_text())
    assert data["runs"] == {"microvm": 1} and data["failures"] == [] and data["ratio"] == {}
    assert all(values[0] > 0 for values in data["samples"]["microvm"].values())
