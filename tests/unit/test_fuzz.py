"""Each coverage-guided fuzz target (tests/fuzz/targets.py) runs briefly under
atheris, over a copy of its corpus: no crash, no hang. Long runs are by hand
(tests/fuzz/run.py TARGET -max_total_time=S), and what they find new is
committed to tests/fuzz/corpus/."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.run import corpus_dir
from tests.fuzz.targets import TARGETS

RUN = Path(__file__).resolve().parents[1] / "fuzz" / "run.py"
RUNS = 3000


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_fuzz_run_finds_nothing(target: str, tmp_path: Path) -> None:
    work = tmp_path / "corpus"
    shutil.copytree(corpus_dir(target), work) if corpus_dir(target).is_dir() else work.mkdir()
    # -rss_limit_mb=0: libFuzzer reads its RSS as getrusage's ru_maxrss, which Linux carries over
    # exec from the parent: after this suite's VMs (GiBs of guest RAM touched) it reads as an OOM.
    proc = subprocess.run([sys.executable, str(RUN), target, str(work), f"-runs={RUNS}", "-seed=1",
                           "-timeout=10", "-rss_limit_mb=0", f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))


@pytest.fixture
def quiet():
    """The devices log a guest's mistakes: thousands of them here. Only for this test."""
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_corpus_replays_without_atheris(target: str, quiet: None) -> None:
    """Every kept input, straight through the target (what a regression looks like)."""
    for path in sorted(corpus_dir(target).glob("*")):
        TARGETS[target](path.read_bytes())
