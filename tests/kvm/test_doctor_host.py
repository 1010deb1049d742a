"""`microvm doctor` on this host, measured for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from microvm.doctor import Verdict, diagnose


def test_doctor_matches_this_host() -> None:
    report = diagnose()
    assert report.missing == []
    assert report.cpl0_ns_per_iter is not None and report.cpl3_ns_per_iter is not None
    # kvm_pvm is a hint, not the test; here the two must agree.
    expected = Verdict.PVM if os.path.exists("/sys/module/kvm_pvm") else Verdict.HARDWARE
    assert report.verdict == expected.value


def test_doctor_cli_json() -> None:
    out = subprocess.run([sys.executable, "-m", "microvm", "doctor", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert data["kind"] in ("pvm", "hardware")
    assert data["api_version"] == 12
    assert data["capabilities"]["KVM_CAP_IRQCHIP"] == 1
