"""Runs of the pytest plugin's sample suite (pytest_sample/), and what to compare in them.

The unit test runs it through a host-side agent, the boot test through real
VMs; both check that a run with the plugin reads like a run without it.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

SAMPLE = Path(__file__).parent / "pytest_sample"
OUTCOMES = {"test_passes": "passed", "test_fails": "failed", "test_fixture_error": "error",
            "test_skipped": "skipped"}
SUMMARY = "1 failed, 1 passed, 1 skipped, 1 error"
# The parts of the terminal output that must read the same with and without the plugin.
COMPARED_SECTIONS = ("ERRORS", "FAILURES", "short test summary info")


def copy_sample(dest: Path) -> None:
    for path in SAMPLE.iterdir():
        if path.is_file():
            shutil.copy(path, dest / path.name)


def junit_cases(report: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """test name -> (outcome, its properties), from a --junitxml report."""
    cases = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        cases[case.get("name", "")] = (outcome, props)
    return cases


def sections(lines: list[str]) -> dict[str, list[str]]:
    """The COMPARED_SECTIONS of pytest's terminal output, without what differs from run to run
    by design (the boot id each test prints, the durations)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        header = re.fullmatch(r"=+ (.+?) =+", line)
        if header:
            name = header.group(1)
            current = found.setdefault(name, []) if name in COMPARED_SECTIONS else None
        elif current is not None and not line.startswith("boot id "):
            current.append(line)
    return found
