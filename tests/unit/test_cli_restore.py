"""`microvm restore DIR`: a bad snapshot is one line and exit 1 before any VM
exists; a good one prints what its command writes from there on and exits
with its status."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from microvm import machine
from microvm.cli import main
from microvm.snapshot import Snapshot
from microvm.snapshot.files import MEMORY, STATE, encode_state


@pytest.fixture(autouse=True)
def no_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to make a VM from the snapshot fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a VM was restored")

    monkeypatch.setattr(Snapshot, "restore_vm", refuse)
    monkeypatch.setattr(machine, "check_host", refuse)


def snapshot_dir(path: Path, state: dict[str, Any]) -> Path:
    path.mkdir()
    (path / STATE).write_bytes(encode_state(state))
    (path / MEMORY).write_bytes(b"")
    return path


def restore(*args: str) -> Result:
    return CliRunner().invoke(main, ["restore", *args])


def assert_one_line_error(r: Result, message: str) -> None:
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("microvm: error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert r.stdout == ""


def test_a_missing_directory(tmp_path: Path) -> None:
    assert_one_line_error(restore(str(tmp_path / "nope")), f"{tmp_path / 'nope'} is not a snapshot: no such directory")


def test_a_file_instead_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    assert_one_line_error(restore(str(tmp_path / "f")), "is not a snapshot: not a directory")


def test_a_directory_without_a_state_file(tmp_path: Path) -> None:
    assert_one_line_error(restore(str(tmp_path)), f"{tmp_path} is not a snapshot: it has no state file")


def test_a_corrupted_state_file(tmp_path: Path) -> None:
    snap = snapshot_dir(tmp_path / "snap", {"kind": "microvm", "memory": {}, "vm": {}, "config": {}})
    data = bytearray((snap / STATE).read_bytes())
    data[-1] ^= 0x01  # a byte of the payload: the header's checksum no longer matches
    (snap / STATE).write_bytes(bytes(data))
    assert_one_line_error(restore(str(snap)), f"{snap / STATE} is corrupted: its checksum does not match")


def test_a_state_that_is_not_a_state_file(tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / STATE).write_text("hello\n")
    assert_one_line_error(restore(str(snap)), "is not a microvm snapshot state file")


def test_a_snapshot_of_a_bare_vm(tmp_path: Path) -> None:
    snap = snapshot_dir(tmp_path / "snap", {"memory": {}, "vm": {}})
    assert_one_line_error(restore(str(snap)), "is a snapshot of a bare VM, not of a MicroVM")


def test_a_snapshot_without_a_machine_configuration(tmp_path: Path) -> None:
    snap = snapshot_dir(tmp_path / "snap", {"kind": "microvm", "memory": {}, "vm": {}})
    assert_one_line_error(restore(str(snap)), "the state has no 'config'")


def test_vsock_for_a_snapshot_without_vsock(tmp_path: Path) -> None:
    snap = snapshot_dir(tmp_path / "snap", {"kind": "microvm", "memory": {}, "vm": {}, "config": {"vsock": None}})
    assert_one_line_error(restore("--vsock", str(tmp_path / "v.sock"), str(snap)),
                          "the snapshot's VM has no vsock device for --vsock")


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "x"])
def test_a_bad_timeout_is_a_usage_error(tmp_path: Path, value: str) -> None:
    r = restore("--timeout", value, str(tmp_path))
    assert r.exit_code == 2 and "--timeout" in r.stderr


def test_help() -> None:
    r = restore("--help")
    assert r.exit_code == 0
    assert "Usage: main restore [OPTIONS] DIR" in r.stdout
    for option in ("--timeout", "--vsock", "--prefetch", "--verify", "--console", "--force"):
        assert option in r.stdout
    assert "restore" in CliRunner().invoke(main, ["--help"]).stdout


class FakeVM:
    """What MicroVM.restore returns: streams the rest of the command's output on wait()."""

    def __init__(self, stdout: Callable[[bytes], Any]) -> None:
        self.stdout = stdout

    def wait(self, timeout: float | None = None) -> machine.RunResult:
        self.stdout(b"n6\n")
        self.stdout(b"done\n")
        return machine.RunResult(exit_code=3, stdout=b"n1\nn5\nn6\ndone\n", console=b"", reason="exit")


def test_prints_the_output_after_the_snapshot_and_exits_with_the_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_restore(cls: type, path: str, **kwargs: Any) -> FakeVM:
        calls.append({"path": path, **kwargs})
        sink = kwargs["stdout"]
        return FakeVM(sink.write)

    monkeypatch.setattr(machine.MicroVM, "restore", classmethod(fake_restore))
    r = restore(str(tmp_path))
    assert r.exit_code == 3
    assert r.stdout == "n6\ndone\n"
    r = restore("--verify", "--prefetch", "--timeout", "5", str(tmp_path))
    assert r.exit_code == 3
    assert [(c["vsock"], c["verify"], c["prefetch"], c["console"]) for c in calls] == [
        (True, False, False, None), (True, True, True, None)]
