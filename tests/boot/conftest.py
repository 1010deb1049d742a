"""Linux-guest tests: run directly where KVM is hardware virtualization,
through the QEMU hardware-virtualization lane where it is PVM.

On a PVM host the first boot test of each file starts the lane and runs
that file's selected tests inside it (each test's outcome written back, as
it ends, through the lane's output share); each test here then reports the
result its twin got inside. Nobody has to choose: `pytest` does the right thing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Generator
from pathlib import Path

import pytest

from microvm.lane import in_lane
from microvm.lane.rerun import IN_LANE_ENV
from tests.conftest import require_kvm

ROOT = Path(__file__).resolve().parents[2]
IN_LANE = in_lane()
# Per lane run (a test file): the slowest needs ~6 minutes.
LANE_TIMEOUT = float(os.environ.get("MICROVM_LANE_TIMEOUT", "1200"))
# Inside the lane, a test still running after this many seconds prints every thread's stack
# (once): a test waiting on a deadlock says where, and the output shows the lane is not frozen
# (a frozen lane's timers stop, this one's included: then no stacks come). Below the lane's
# freeze detection (microvm/lane/run.py FREEZE_AFTER, 90 s). A few tests take longer by design
# (test_many_boots_leak_nothing: ~100 s): they print the stacks too, as a note, not a failure.
LANE_STACKS_AFTER = 80.0
# Files that run many VMs at once get more memory: (vCPUs, MiB); others (1, 2048). One
# vCPU throughout: a 2-vCPU lane runs QEMU's multi-threaded TCG, and the one guest
# triple fault we ever saw in the lane (1 boot of ~20, never reproduced in 48 more) was there.
LANE_SIZE = {"test_sandbox": (1, 4096), "test_snapshot": (1, 4096), "test_dask": (1, 4096),
             "test_pytest_plugin": (1, 3072)}


@functools.cache
def _mode() -> str:
    """"direct" (hardware KVM, or inside the lane) or "lane" (PVM host)."""
    if IN_LANE:
        return "direct"
    from microvm.doctor import Verdict, host_verdict

    return "lane" if host_verdict() is Verdict.PVM else "direct"


# Inside the lane, each test's outcome is appended to this file (in the lane's
# output share) as it ends: a lane that freezes mid-file keeps what it finished.
PROGRESS_ENV = "MICROVM_LANE_PROGRESS"
# A test during which the lane froze this many times fails (the lane runs on
# with the file's other tests); so does one the lane's timeout ended twice.
MAX_FREEZES, MAX_TIMEOUTS = 3, 2


@functools.cache
def _lane_results(config: pytest.Config, selection: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Run the selected boot tests inside the lane, one lane per test file (a
    frozen lane then costs one file's time, not the suite's); nodeid -> (outcome, text).

    The lane (nested SVM under TCG) has been seen to freeze outright now and
    then. Each test's result reaches us as it ends, so a frozen or overdue
    lane is started again with the tests it had not finished: the one it
    froze in is tried again, up to MAX_FREEZES times (MAX_TIMEOUTS for a run
    that overstays its timeout), then fails alone."""
    from microvm.lane import LaneError, LaneFrozen, LaneTimeout, lane_available, run_in_lane

    reason = lane_available()
    if reason is not None:
        return {"__error__": ("failed", f"this host is PVM and the hardware-virtualization lane is "
                                        f"unavailable: {reason}")}
    out_dir = Path(os.environ.get("MICROVM_LANE_OUT") or ROOT / "build" / "lane-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    file = selection[0].split("::")[0]
    progress = out_dir / f"boot-progress-{Path(file).stem}.jsonl"
    progress.unlink(missing_ok=True)
    env = {IN_LANE_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1", PROGRESS_ENV: str(progress)}
    for key in ("MICROVM_CACHE", "HOME", "PATH", "MICROVM_REQUIRE_KVM"):
        if key in os.environ:
            env[key] = os.environ[key]
    smp, mem_mib = LANE_SIZE.get(Path(file).stem, (1, 2048))
    outcomes: dict[str, tuple[str, str]] = {}
    freezes: dict[str, int] = {}
    timeouts: dict[str, int] = {}
    attempt = 0
    # Show the inner run's progress live (CI logs), not in pytest's capture.
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        while left := [nodeid for nodeid in selection if nodeid not in outcomes]:
            attempt += 1
            print(f"\n[tests/boot] PVM host: running {file} ({len(left)} tests) inside the "
                  f"hardware-virtualization lane" + (f", attempt {attempt}" if attempt > 1 else ""), flush=True)
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *left]
            try:
                result = run_in_lane(argv, cwd=str(ROOT), env=env, out_dir=out_dir, timeout=LANE_TIMEOUT,
                                     smp=smp, mem_mib=mem_mib)
            except (LaneFrozen, LaneTimeout) as e:
                started = _read_progress(progress, outcomes)
                if started is None:  # between tests, or before the first: the next one's
                    started = next((n for n in selection if n not in outcomes), None)
                if started is None:
                    break
                what = "froze" if isinstance(e, LaneFrozen) else "timed out"
                counts, limit = (freezes, MAX_FREEZES) if isinstance(e, LaneFrozen) else (timeouts, MAX_TIMEOUTS)
                counts[started] = counts.get(started, 0) + 1
                print(f"[tests/boot] lane attempt {attempt} {what} in {started} "
                      f"({counts[started]} of {limit}): {e}", flush=True)
                if counts[started] == limit:
                    outcomes[started] = ("failed", f"the hardware-virtualization lane {what} {limit} times "
                                                   f"in this test: {e}")
                continue
            except LaneError as e:
                _read_progress(progress, outcomes)
                for nodeid in left:
                    outcomes.setdefault(nodeid, ("failed", f"the hardware-virtualization lane failed: {e}"))
                break
            _read_progress(progress, outcomes)
            for nodeid in left:  # the lane ran to its end: a test it did not finish never will
                outcomes.setdefault(nodeid, ("failed", f"the lane's pytest did not finish this test "
                                                       f"(exit {result.returncode}):\n{result.output[-4000:]}"))
    return outcomes


def _read_progress(path: Path, outcomes: dict[str, tuple[str, str]]) -> str | None:
    """Add the outcomes the lane wrote to `path` to `outcomes`; the test it
    started last and did not finish, if any."""
    running = None
    with contextlib.suppress(FileNotFoundError), path.open() as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut short where the lane stopped
                continue
            if entry["event"] == "start":
                running = entry["nodeid"]
            else:
                outcomes[entry["nodeid"]] = (entry["outcome"], entry["text"])
                running = None
    return running


class _Progress:
    """Inside the lane: each test's start and outcome, one JSON line each, to
    the file the outer run reads (written through at once: the lane may
    freeze the next moment)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.result: dict[str, tuple[str, str]] = {}

    def write(self, entry: dict[str, str]) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    def pytest_unconfigure(self) -> None:
        self.close()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.write({"event": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        outcome, _ = self.result.get(report.nodeid, ("passed", ""))
        if outcome == "failed":  # the first failure is the test's
            return
        if report.failed:
            self.result[report.nodeid] = ("failed", report.longreprtext)
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.result[report.nodeid] = ("skipped", reason)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        outcome, text = self.result.pop(nodeid, ("passed", ""))
        self.write({"event": "end", "nodeid": nodeid, "outcome": outcome, "text": text})


def boots_here() -> bool:
    """True where this process runs the guests itself (hardware KVM, or inside the
    lane). On a PVM host the tests run in the lane, and a fixture that would boot a
    VM here must not: it yields None instead (its test's result comes from the lane)."""
    return _mode() == "direct"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/boot/" in str(item.fspath):
            item.add_marker(pytest.mark.boot)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker("boot") is None or _mode() == "direct":
        return None
    # Every selected test of this file, in one lane run.
    file = pyfuncitem.nodeid.split("::")[0]
    selection = tuple(sorted(i.nodeid for i in pyfuncitem.session.items
                             if i.get_closest_marker("boot") and i.nodeid.split("::")[0] == file))
    results = _lane_results(pyfuncitem.config, selection)
    outcome, text = results.get(pyfuncitem.nodeid, results.get("__error__", ("missing", "")))
    if outcome == "failed":
        pytest.fail(f"failed inside the hardware-virtualization lane:\n{text}", pytrace=False)
    if outcome == "skipped":
        pytest.skip(f"skipped inside the lane: {text}")
    if outcome == "missing":
        pytest.fail(f"{pyfuncitem.nodeid} did not run inside the lane", pytrace=False)
    return True


@pytest.fixture(autouse=True)
def _boot_needs_kvm(request: pytest.FixtureRequest) -> None:
    if _mode() == "direct":
        require_kvm()


class _Watchdog:
    """One thread for the whole run (tests that count this process's threads
    see the same number before and after, however long they take): it prints
    every thread's stack once a test has run for LANE_STACKS_AFTER s. From
    Python, with the GIL held (faulthandler's timeout dumps other threads
    without it, and crashed the lane's pytest once, mid-dump, in a Dask test)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.test: tuple[str, float] | None = None  # (nodeid, deadline)
        thread = threading.Thread(target=self._watch, name="boot-test-watchdog", daemon=True)
        thread.start()

    def begin(self, nodeid: str) -> None:
        with self.cond:
            self.test = (nodeid, time.monotonic() + LANE_STACKS_AFTER)
            self.cond.notify()

    def end(self) -> None:
        with self.cond:
            self.test = None
            self.cond.notify()

    def _watch(self) -> None:
        with self.cond:
            while True:
                test = self.test
                if test is None:
                    self.cond.wait()
                elif (left := test[1] - time.monotonic()) > 0:
                    self.cond.wait(left)
                else:
                    _print_stacks(test[0])
                    while self.test is test:  # once per test
                        self.cond.wait()


def _print_stacks(nodeid: str) -> None:
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [f"\n[tests/boot] {nodeid} still running after {LANE_STACKS_AFTER:.0f} s; every thread's stack:\n"]
    for ident, frame in sys._current_frames().items():
        lines.append(f"--- thread {names.get(ident, '?')} ({ident}):\n")
        lines.extend(traceback.format_stack(frame))
    data = "".join(lines).encode(errors="replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(_stderr_fd, data):]


# pytest captures fd 2 while a test runs: the stacks go to a copy of the real one, made
# in pytest_configure (capture is suspended then), as pytest's faulthandler plugin does.
_stderr_fd = 2


def pytest_configure(config: pytest.Config) -> None:
    global _stderr_fd
    if IN_LANE and _stderr_fd == 2:
        _stderr_fd = os.dup(2)
    if IN_LANE and os.environ.get(PROGRESS_ENV) and not config.pluginmanager.has_plugin("boot-progress"):
        config.pluginmanager.register(_Progress(os.environ[PROGRESS_ENV]), "boot-progress")


@functools.cache
def _watchdog() -> _Watchdog:
    return _Watchdog()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    if not IN_LANE:
        yield
        return
    _watchdog().begin(item.nodeid)
    try:
        yield
    finally:
        _watchdog().end()
