"""Lint and type checks are part of the test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    _run(sys.executable, "-m", "ruff", "check", "microvm", "tests", "bench")


def test_mypy() -> None:
    _run(sys.executable, "-m", "mypy")
