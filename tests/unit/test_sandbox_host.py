"""The sandbox's host side without a VM: the vsock handshake's errors, the CLI's
argument handling, refusals before anything boots."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from microvm.cli import main
from microvm.errors import ConfigError
from microvm.sandbox import Executor, Sandbox, SandboxError, SerializationError
from microvm.sandbox.cli import _argument, _function
from microvm.sandbox.core import _vsock_connect


def _server(path: Path, reply: bytes | None) -> threading.Thread:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(64)
        if reply is not None:
            conn.sendall(reply)
        conn.close()
        listener.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_the_handshake(tmp_path: Path) -> None:
    path = tmp_path / "v.sock"
    with pytest.raises(FileNotFoundError):
        _vsock_connect(str(path), 52, 1.0)  # no VM socket there
    _server(path, None)  # the device closes: nobody listens on that port in the guest
    with pytest.raises(ConnectionRefusedError, match="nothing listens on vsock port 52"):
        _vsock_connect(str(path), 52, 1.0)
    path.unlink()
    _server(path, b"NO\n")
    with pytest.raises(ConnectionError, match="refused"):
        _vsock_connect(str(path), 52, 1.0)
    path.unlink()
    _server(path, b"OK 1073741824\n")
    _vsock_connect(str(path), 52, 1.0).close()


def test_bad_sandbox_config_is_refused_before_anything_boots() -> None:
    with pytest.raises(ConfigError, match="timeout"):
        Sandbox(timeout=-1)
    with pytest.raises(ConfigError, match="network must be False or a Nic"):
        Sandbox(network=True)
    with pytest.raises(ConfigError, match="env name"):
        Sandbox(env={"1BAD": "x"})
    with pytest.raises(SandboxError, match="not running"):
        Sandbox().call(abs, 1)


def test_an_unpicklable_call_is_refused_by_the_executor_before_any_vm(monkeypatch: pytest.MonkeyPatch) -> None:
    booted: list[object] = []
    monkeypatch.setattr("microvm.sandbox.pool.SandboxPool._boot", lambda self: booted.append(self))
    ex = Executor(max_workers=1, image=object())
    with pytest.raises(SerializationError, match="cannot pickle"):
        ex.submit(len, threading.Lock())
    ex.shutdown()
    assert len(booted) == 1  # the pool's one boot was asked for at construction, none for the call


def test_cli_arguments() -> None:
    assert _argument("42") == 42 and _argument("[1, 'a']") == [1, "a"] and _argument("hello") == "hello"
    assert _function("json:dumps")({"a": 1}) == '{"a": 1}'
    with pytest.raises(ConfigError, match="expected MODULE:FUNCTION"):
        _function("json")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_x'"):
        _function("no_such_module_x:f")
    with pytest.raises(ConfigError, match="has no 'nope'"):
        _function("json:nope")
    r = CliRunner().invoke(main, ["call", "json"])
    assert r.exit_code == 1 and r.output.strip() == "microvm: error: expected MODULE:FUNCTION, got 'json'"
    r = CliRunner().invoke(main, ["exec", "--image", "x", "--venv", "y", "--", "true"])
    assert r.exit_code == 2 and "give --image or --venv, not both" in r.output
