"""One test marked microvm, run in a fresh VM and reported here as if run here.

The host boots a sandbox and runs one exec there: a short bootstrap that
unpacks the tar it gets on stdin (crossing.py) into GUEST_DIR and runs
`python -m pytest -p no:microvm -p no:cacheprovider -p microvm_pytest_guest
--rootdir ROOT NODEID` in the rootdir's copy. The guest plugin (guest.py)
writes every report as a line of JSON on the exec's stdout; the host turns
each line into a report with pytest's own pytest_report_from_serializable
(as pytest-xdist does), puts the host's rootdir where the guest's was in
every path, and replays the test's reports through the item's hooks. So the
terminal, --junitxml, -x and the summary see a failure, a fixture error, a
skip, captured output and the guest's traceback as from a local run. The
guest's pytest uses the host's --tb, -l, -v/-q, --import-mode and -o.

What the guest says is untrusted: a line that is not a report, a report for
another test, or phases out of order are left out. If the run ends before
the test's teardown report (the VM crashed, the test timed out, pytest
could not start), the missing phase is reported failed with the reason
(SandboxCrashed and its console tail, the timeout, pytest's own output).
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest

from microvm.pytest_plugin.guest import GUEST_ENV, REPORTS_FD_ENV

if TYPE_CHECKING:
    from microvm.pytest_plugin import State
    from microvm.sandbox.session import Session

GUEST_DIR = "/tmp/microvm-pytest"  # a tmpfs in the guest: its root image is read-only
GUEST_MODULE = "microvm_pytest_guest"
PHASES = ("setup", "call", "teardown")
OUTPUT_TAIL = 4000  # bytes of the guest's pytest output quoted when it ended early
MAX_REPORT_BYTES = 64 << 20  # the report lines one test may send

# Runs in the guest as `python -c BOOTSTRAP GUEST_DIR ARGS...`: unpack the tar
# from stdin, then run `python -m pytest ARGS...` in the rootdir's copy, in this
# process (one interpreter start less, seconds in a nested guest). The exec's
# stdout carries only the guest plugin's report lines (REPORTS_FD, a copy of
# fd 1); pytest's own output, fd 1 and 2, goes to the exec's stderr.
BOOTSTRAP = f"""
import os, runpy, sys, tarfile
base = sys.argv[1]
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
    tar.extractall(base, **({{"filter": "data"}} if hasattr(tarfile, "data_filter") else {{}}))
root = os.path.join(base, "root")
os.makedirs(root, exist_ok=True)
os.chdir(root)
sys.path.insert(1, os.path.join(base, "lib"))
os.environ["{REPORTS_FD_ENV}"] = str(os.dup(1))
os.dup2(2, 1)
sys.argv = ["pytest", *sys.argv[2:]]
runpy.run_module("pytest", run_name="__main__", alter_sys=True)
"""


def run_marked(item: pytest.Item, nextitem: pytest.Item | None, state: State) -> None:
    """The runtest protocol for a marked item: logstart, its reports from the VM, logfinish."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _reports(item, state):
        ihook.pytest_runtest_logreport(report=report)
    host_teardown = _teardown_here(item, nextitem)
    if host_teardown is not None:
        ihook.pytest_runtest_logreport(report=host_teardown)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def _reports(item: pytest.Item, state: State) -> list[pytest.TestReport]:
    from microvm.errors import MicroVMError
    from microvm.pytest_plugin.crossing import CrossingError
    from microvm.pytest_plugin.options import vm_config

    try:
        vm = vm_config(item, "microvm", state.settings())
        if "sandbox" in getattr(item, "fixturenames", ()):
            raise ValueError("a test marked microvm runs in a VM already: the sandbox fixture is not "
                             "available there (a guest has no /dev/kvm)")
        if not item.path.is_relative_to(item.config.rootpath):
            raise ValueError(f"{item.path} is outside the rootdir {item.config.rootpath}, "
                             f"which is what crosses into the VM")
        payload = state.payload()
    except (ValueError, CrossingError, pytest.UsageError) as e:
        return _completed(item, [], f"microvm: {e}")
    try:
        sb = state.start_sandbox(vm)
    except MicroVMError as e:
        return _completed(item, [], f"microvm: cannot start the test's VM: {type(e).__name__}: {e}")
    try:
        return GuestRun(item, sb, state.guest_dir).run(payload, vm.timeout)
    finally:
        sb.close()


class GuestRun:
    def __init__(self, item: pytest.Item, sb: Session, guest_dir: str):
        self.item = item
        self.config = item.config
        self.sb = sb
        self.guest_dir = guest_dir
        self.guest_root = f"{guest_dir}/root"
        self.boot_id = str(getattr(sb, "boot_id", ""))

    def argv(self) -> list[str]:
        python = getattr(getattr(self.sb, "image", None), "python", None) or "python3"
        return [python, "-c", BOOTSTRAP, self.guest_dir, *self.pytest_args(), self.item.nodeid]

    def pytest_args(self) -> list[str]:
        """The guest's pytest options: the plugin off, reporting as the host's options ask."""
        c = self.config
        args = ["-p", "no:microvm", "-p", "no:cacheprovider", "-p", GUEST_MODULE, f"--rootdir={self.guest_root}"]
        inipath = c.inipath
        if inipath is not None and inipath.is_relative_to(c.rootpath):
            args += ["-c", str(inipath.relative_to(c.rootpath))]
        option = c.option
        if getattr(option, "tbstyle", "auto") != "auto":
            args.append(f"--tb={option.tbstyle}")
        if getattr(option, "showlocals", False):
            args.append("-l")
        verbose = int(getattr(option, "verbose", 0) or 0)
        args += ["-v"] * max(verbose, 0) or ["-q"] * -verbose
        importmode = getattr(option, "importmode", None)
        if importmode:
            args.append(f"--import-mode={importmode}")
        for override in getattr(option, "override_ini", None) or ():
            args += ["-o", override]
        return args

    def run(self, payload: bytes, timeout: float | None) -> list[pytest.TestReport]:
        """The item's reports from one exec in the guest, completed if they stop short."""
        from microvm.errors import CallTimeout, SandboxError

        env = {GUEST_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1"}
        lines, output = bytearray(), bytearray()
        try:
            stream = self.sb.exec_stream(self.argv(), input=payload, env=env, timeout=timeout)
            for fd, data in stream:
                if fd == 2:
                    output += data
                    del output[:-OUTPUT_TAIL]
                    continue
                lines += data
                if len(lines) > MAX_REPORT_BYTES:
                    stream.kill()
                    raise _Stop(f"microvm: the guest sent over {MAX_REPORT_BYTES} bytes of reports; killed it")
            why = (f"pytest in the guest ended (exit status {stream.returncode}) before the test's reports were "
                   f"complete; its output ends:\n{output.decode(errors='replace')}")
        except _Stop as e:
            why = str(e)
        except CallTimeout:
            why = f"the test did not finish within {timeout} s in its VM (killed there)"
        except SandboxError as e:  # SandboxCrashed: the guest ended; its console tail is in the message
            why = f"{type(e).__name__}: {e}"
        reports, problems = self.parse(bytes(lines))
        return _completed(self.item, reports, "\n".join([why, *problems]), self.boot_id)

    def parse(self, raw: bytes) -> tuple[list[pytest.TestReport], list[str]]:
        """The item's reports, in phase order, and what was wrong with the rest."""
        reports: list[pytest.TestReport] = []
        problems: list[str] = []
        seen = -1
        for n, line in enumerate(raw.splitlines(), 1):
            try:
                report = self.config.hook.pytest_report_from_serializable(
                    config=self.config, data=_fix_types(self._rewrite(json.loads(line))))
            except Exception as e:  # whatever garbage raises: the guest is not trusted
                problems.append(f"microvm: report line {n} from the guest is unreadable: {type(e).__name__}: {e}")
                continue
            if isinstance(report, pytest.CollectReport) and report.failed and not reports:
                reports.append(_report(self.item, "setup", "failed", report.longrepr))
                seen = 0
            elif (isinstance(report, pytest.TestReport) and report.nodeid == self.item.nodeid
                    and report.when in PHASES and PHASES.index(report.when) > seen):
                seen = PHASES.index(report.when)
                reports.append(report)
        for report in reports:
            report.user_properties = [*report.user_properties, ("microvm_boot_id", self.boot_id)]
        return reports, problems

    def _rewrite(self, value: Any) -> Any:
        """The host's rootdir where the guest's copy of it is named (tracebacks, skip locations)."""
        if isinstance(value, str):
            return value.replace(self.guest_root, str(self.config.rootpath))
        if isinstance(value, list):
            return [self._rewrite(v) for v in value]
        if isinstance(value, dict):
            return {k: self._rewrite(v) for k, v in value.items()}
        return value


def _fix_types(data: Any) -> Any:
    """The tuples JSON made lists, back as pytest builds them (location, a skip's longrepr, sections)."""
    if not isinstance(data, dict):
        raise TypeError(f"a report is a JSON object, not {type(data).__name__}")
    for key in ("location", "sections", "user_properties"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key]) if key == "location" else [tuple(x) for x in data[key]]
    if data.get("outcome") == "skipped" and isinstance(data.get("longrepr"), list):
        data["longrepr"] = tuple(data["longrepr"])
    return data


class _Stop(Exception):
    pass


class Why:
    """A failure's text as a report's longrepr, with the first line as its crash message (what the
    short summary and --junitxml's message show, as for an exception's)."""

    def __init__(self, text: str):
        self.text = text
        self.reprcrash = SimpleNamespace(message=text.splitlines()[0] if text else "")

    def toterminal(self, tw: Any) -> None:
        tw.line(self.text)

    def __str__(self) -> str:
        return self.text


def _completed(item: pytest.Item, reports: list[pytest.TestReport], why: str,
               boot_id: str = "") -> list[pytest.TestReport]:
    """reports, completed up to teardown if they stop short: the first missing phase failed with why."""
    if reports and reports[-1].when == "teardown":
        return reports
    last = reports[-1] if reports else None
    if last is None:
        missing = "setup"
    elif last.when == "setup" and last.passed:
        missing = "call"
    else:
        missing = "teardown"
    props: list[tuple[str, object]] = [("microvm_boot_id", boot_id)] if boot_id else []
    done = [*reports, _report(item, missing, "failed", Why(why.strip()), props)]
    if missing != "teardown":
        done.append(_report(item, "teardown", "passed", None, props))
    return done


def _report(item: pytest.Item, when: str, outcome: str, longrepr: Any,
            user_properties: list[tuple[str, object]] | None = None) -> pytest.TestReport:
    return pytest.TestReport(item.nodeid, item.location, dict.fromkeys(item.keywords, 1), outcome,  # type: ignore[arg-type]
                             longrepr, when, user_properties=user_properties)  # type: ignore[arg-type]


def _teardown_here(item: pytest.Item, nextitem: pytest.Item | None) -> pytest.TestReport | None:
    """Tear down what earlier local tests set up here and nextitem does not need, as the
    runner's teardown would have (else the next local test finds a stale fixture stack);
    its failure is this item's teardown error, as it would be locally."""
    setupstate = getattr(item.session, "_setupstate", None)
    if setupstate is None:
        return None
    if item.session.shouldfail or item.session.shouldstop:
        nextitem = None
    call = pytest.CallInfo.from_call(lambda: setupstate.teardown_exact(nextitem), "teardown",
                                     reraise=(pytest.exit.Exception, KeyboardInterrupt))
    if call.excinfo is None:
        return None
    return pytest.TestReport.from_item_and_call(item, call)
