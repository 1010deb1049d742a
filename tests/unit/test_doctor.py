"""The doctor's verdict logic, fed with measurements from each kind of host."""

from __future__ import annotations

import pytest

from microvm.doctor import Report, Verdict, render, verdict


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
