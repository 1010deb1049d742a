"""What the package promises about its extras: matplotlib (the `bench` extra)
is needed only for a plot, and asking for one without it says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from microvm.benchmarks import cli as bench_cli
from microvm.benchmarks import guest
from microvm.cli import main

ROOT = Path(__file__).resolve().parents[2]

@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import matplotlib` fails from here on, as where the bench extra is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: ImportError


@pytest.fixture
def lanes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stands in for the lane (and the benchmark itself): records the command, exits 0."""
    calls: list[str] = []

    def stand_in(command: str, out: Path, smp: int | None = None) -> None:
        calls.append(command)
        raise SystemExit(0)

    monkeypatch.setattr(bench_cli, "_in_lane", stand_in)
    monkeypatch.setattr(guest, "kernel_path", lambda kernel_format: Path(f"/k/{kernel_format}"))
    return calls


@pytest.mark.usefixtures("no_matplotlib")
def test_bench_boot_without_matplotlib_names_the_extra(tmp_path: Path, lanes: list[str]) -> None:
    out = tmp_path / "bench"
    for args in (["-n", "1", "--qemu"], []):
        result = CliRunner().invoke(main, ["bench", "boot", *args, "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert result.stdout == ""
        assert result.stderr == "microvm: error: plotting needs matplotlib: pip install 'microvm[bench]'\n"
    assert not lanes and not out.exists()  # said before anything ran


@pytest.mark.usefixtures("no_matplotlib")
def test_bench_without_a_plot_needs_no_matplotlib(tmp_path: Path, lanes: list[str]) -> None:
    for args in (["footprint", "--count", "2", "--processes", "0"], ["rate", "--count", "1"]):
        result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path)])
        assert result.exit_code == 0, result.output
    assert lanes == ["footprint", "rate"]


def test_runtime_and_cli_do_not_import_matplotlib() -> None:
    pytest.importorskip("microvm._kvm")  # microvm.machine imports it (no /dev/kvm needed)
    code = ("import sys, microvm.machine, microvm.cli, microvm.doctor, microvm.benchmarks.cli; "
            "print([m for m in sys.modules if m.split('.')[0] == 'matplotlib'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout == "[]\n"

