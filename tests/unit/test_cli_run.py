"""`microvm run`'s own options: mistakes are usage errors before anything boots."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from microvm import machine
from microvm.cli import main


@pytest.fixture(autouse=True)
def no_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to boot (or to measure the host for PVM) fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a VM was started")

    monkeypatch.setattr(machine.MicroVM, "start", refuse)
    monkeypatch.setattr(machine, "check_host", refuse)


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus", "--", "echo", "hi"], "No such option '--bogus'"),
    (["--vcpu", "2", "--", "nproc"], "Did you mean '--vcpus'"),
    (["--timeout", "0", "--", "true"], "--timeout"),
    (["--timeout", "-1", "--", "true"], "--timeout"),
    (["--timeout", "inf", "--", "true"], "--timeout"),
    (["--timeout", "nan", "--", "true"], "--timeout"),
    (["--mem", "x", "--", "true"], "--mem"),
])
def test_usage_errors_exit_2_before_booting(args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["run", *args])
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--mem", "8", "--", "true"], "mem_mib must be between"),
    (["--append", "-- x", "--", "true"], "append contains '--'"),
    (["--append", 'x="y', "--", "true"], "unbalanced double quote"),
])
def test_bad_values_are_one_line_errors(args: list[str], message: str) -> None:
    r = CliRunner().invoke(main, ["run", *args])
    assert r.exit_code == 1
    assert r.stderr.startswith("microvm: error: ") and message in r.stderr
    assert r.stderr.count("\n") == 1


def test_options_of_the_guest_command_stay_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def run(self: machine.MicroVM, argv: list[str], timeout: float | None = None) -> machine.RunResult:
        seen.append(argv)
        return machine.RunResult(exit_code=3, stdout=b"", console=b"", reason="exit")

    monkeypatch.setattr(machine.MicroVM, "run", run)
    r = CliRunner().invoke(main, ["run", "--mem", "64", "ls", "-l", "--bogus"])
    assert r.exit_code == 3
    r = CliRunner().invoke(main, ["run", "--", "--bogus"])
    assert seen == [["ls", "-l", "--bogus"], ["--bogus"]]


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(self: machine.MicroVM, argv: list[str], timeout: float | None = None) -> machine.RunResult:
        raise KeyboardInterrupt

    monkeypatch.setattr(machine.MicroVM, "run", run)
    r = CliRunner().invoke(main, ["run", "--", "sleep", "100"])
    assert r.exit_code == 130
    assert r.stderr == "microvm: interrupted\n"
