"""The doctor's verdict logic, fed with measurements from each kind of host."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.doctor import Report, Verdict, plainly_hardware, render, verdict


@pytest.mark.parametrize(
    "cpl0,cpl3,expected",
    [
        (1200.0, 0.4, Verdict.PVM),  # this kind of machine: CPL0 emulated
        (2600.0, 0.33, Verdict.PVM),
        (0.4, 0.4, Verdict.HARDWARE),  # bare-metal KVM: both native
        (0.6, 0.3, Verdict.HARDWARE),
        (130.0, 120.0, Verdict.HARDWARE),  # KVM inside a TCG lane: slow, but both alike
        (40.0, 0.3, Verdict.HARDWARE),  # noisy but under the emulation threshold
    ],
)
def test_verdict_from_measurements(cpl0: float, cpl3: float, expected: Verdict) -> None:
    assert verdict(True, cpl0, cpl3) is expected


def test_no_kvm() -> None:
    assert verdict(False, None, None) is Verdict.NO_KVM
    assert verdict(True, None, 0.3) is Verdict.NO_KVM


def test_report_renders_and_serialises() -> None:
    r = Report("/dev/kvm", Verdict.PVM.value, api_version=12, cpl0_ns_per_iter=1200.0,
               cpl3_ns_per_iter=0.4, pvm_module=True)
    assert "PVM" in render(r) and "1200.00" in render(r)
    assert r.to_dict()["kind"] == "pvm"


@pytest.mark.parametrize("pvm_module,flags,want", [
    (False, "fpu vme svm lm", True),
    (False, "fpu vmx lm", True),
    (True, "fpu svm lm", False),  # PVM loaded: measure, do not guess
    (False, "fpu lm hypervisor", False),  # no VMX/SVM: a nested or PVM host; measure
])
def test_plainly_hardware(tmp_path: Path, pvm_module: bool, flags: str, want: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    module = tmp_path / "kvm_pvm"
    if pvm_module:
        module.mkdir()
    assert plainly_hardware(str(module), str(cpuinfo)) is want


def test_check_host_reads_the_cpu_flags_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every VM's start calls check_host(); /proc/cpuinfo is read at the first only."""
    from microvm import doctor

    reads: list[str] = []
    monkeypatch.setattr(doctor, "plainly_hardware", lambda: reads.append("cpuinfo") or True)
    doctor.plainly_hardware_here.cache_clear()
    try:
        for _ in range(3):
            doctor.check_host()
        assert reads == ["cpuinfo"]
    finally:
        doctor.plainly_hardware_here.cache_clear()
