"""The guest agent and the host's Session, over a Unix socket on the host.

The agent (microvm/agent/server.py) is the very program a sandbox's guest
runs; here it runs as a host process listening on a Unix socket instead of
vsock, so the protocol, the call/exec/put/get paths and the host's defences
against a hostile agent are tested without a VM. tests/boot/test_sandbox.py
runs the same through a real guest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microvm.agent import identity
from microvm.agent.protocol import HEADER, encode
from microvm.errors import AgentError, CallTimeout, RemoteError, SandboxError
from microvm.sandbox import SerializationError, Session
from microvm.sandbox.client import QUEUED_EVENTS, AgentClient
from microvm.sandbox.core import agent_files
from tests.support.local_agent import LocalAgent


def module_level_square(x: int) -> int:
    return x * x


class GuestOnlyError(Exception):
    pass


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("agent")
    for name, data in agent_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    path = str(root / "agent.sock")
    proc = subprocess.Popen([sys.executable, "-m", "microvm_agent", "--unix", path],
                            env={**os.environ, "PYTHONPATH": str(root / "lib")}, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"microvm-agent ready\n"
    yield path
    proc.kill()
    proc.wait()


@pytest.fixture
def session(agent: str) -> Iterator[Session]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(agent)
    client = AgentClient(s)
    yield Session(client, timeout=30)
    client.close()


def test_calls_return_values(session: Session) -> None:
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    assert session.call(lambda a, b: a * b, 6, 7) == 42
    assert session.call(closure, 5) == 15
    assert session.call(module_level_square, 9) == 81
    assert session.call(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert session.ping()["ev"] == "pong"


def test_a_guest_exception_comes_back_as_its_type_with_the_guest_traceback(session: Session) -> None:
    def fail() -> None:
        raise GuestOnlyError("from the guest")

    with pytest.raises(GuestOnlyError, match="from the guest") as info:
        session.call(fail)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "guest traceback" in notes and "in fail" in notes and "GuestOnlyError" in notes
    frames = [code.co_name for code in _walk(info.value.__traceback__)]
    assert "fail" in frames  # the guest's frames, rebuilt by tblib


def _walk(tb):  # type: ignore[no-untyped-def]
    while tb is not None:
        yield tb.tb_frame.f_code
        tb = tb.tb_next


def test_a_call_that_dies_is_reported_and_the_agent_serves_on(session: Session) -> None:
    with pytest.raises(RemoteError, match="exited with status 3 before it returned"):
        session.call(os._exit, 3)
    assert session.call(int, "4") == 4


def test_unpicklable_calls_fail_before_anything_is_sent() -> None:
    lonely = Session(None)  # no agent at all: the error must come first
    with pytest.raises(SerializationError, match="cannot pickle"):
        lonely.call(len, threading.Lock())
    with pytest.raises(SandboxError, match="not connected"):
        lonely.call(len, [1])


def test_exec_streams_output_before_the_command_ends(session: Session, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    stream = session.exec_stream(["sh", "-c", f"echo first; while [ ! -e {gate} ]; do sleep 0.01; done; "
                                              "echo second; echo err >&2; exit 5"])
    chunks = iter(stream)
    assert next(chunks) == (1, b"first\n")  # the command is still waiting for the gate
    gate.touch()
    rest = list(chunks)
    assert (1, b"second\n") in rest and (2, b"err\n") in rest
    assert stream.returncode == 5
    done = session.exec(["cat"], input=b"x" * 300_000)
    assert done.returncode == 0 and done.stdout == b"x" * 300_000


def test_files_round_trip(session: Session, tmp_path: Path) -> None:
    blob = os.urandom(20 << 20)
    src = tmp_path / "blob"
    src.write_bytes(blob)
    session.put(src, str(tmp_path / "guest-blob"))
    back = tmp_path / "back"
    session.get(str(tmp_path / "guest-blob"), back)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(blob).digest()
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f").write_text("deep")
    session.put(tmp_path / "tree", str(tmp_path / "guest-tree"))
    session.get(str(tmp_path / "guest-tree"), tmp_path / "tree-back")
    assert (tmp_path / "tree-back" / "sub" / "f").read_text() == "deep"
    with pytest.raises(FileNotFoundError):
        session.get(str(tmp_path / "nothing-here"))


def test_cancel_kills_the_running_call(session: Session, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    def linger(path: str) -> None:
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)

    future = session.submit(linger, str(pidfile))
    while not pidfile.exists() or not pidfile.read_text():
        time.sleep(0.01)
    pid = int(pidfile.read_text())
    assert future.running() and future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(10)
    assert future.cancelled()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed, and reaped by the agent


def test_a_timeout_kills_that_call_and_the_session_stays_usable(session: Session) -> None:
    with pytest.raises(CallTimeout):
        session.call_with(time.sleep, (30,), timeout=0.3)
    with pytest.raises(CallTimeout):
        session.exec(["sleep", "30"], timeout=0.3)
    assert session.call(abs, -3) == 3


def test_many_requests_at_once(session: Session) -> None:
    results: list[int] = []

    def worker(k: int) -> None:
        for i in range(10):
            results.append(session.call(module_level_square, k * 100 + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted((k * 100 + i) ** 2 for k in range(6) for i in range(10))


# --- refresh and preload (agent/identity.py) ---------------------------------------------
# Never Session.refresh() here: it sends the host's time, and this agent runs on the
# host, where it would set the host's clock. The requests below send time_ns=0 (the
# agent sets no time then) and a little entropy (credited to the host's pool: harmless).


def _modules_loaded(names: list[str]) -> list[str]:
    import sys

    return [n for n in names if n in sys.modules]


def _live_children(pid: int) -> set[int]:
    """The child processes of `pid` that have not exited."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state not in ("Z", "X"):
            children.add(int(entry))
    return children


def _spare(agent: LocalAgent, last_call: int) -> int:
    """The agent's spare call process: its only child, once the last call's process is gone."""
    deadline = time.monotonic() + 10
    while True:
        children = _live_children(agent.proc.pid)
        if len(children) == 1 and last_call not in children:
            return children.pop()
        assert time.monotonic() < deadline, f"the agent's children: {children}"
        time.sleep(0.01)


def _refresh(session: Session, entropy: bytes) -> dict[str, Any]:
    return session._final(session._request("refresh", entropy=entropy, time_ns=0), 30)


@pytest.fixture
def fresh_agent() -> Iterator[LocalAgent]:
    """An agent of its own: nothing preloaded, spares only this test's."""
    agent = LocalAgent(timeout=30)
    yield agent
    agent.close()


def test_preload_reaches_every_later_call(fresh_agent: LocalAgent) -> None:
    names = ["decimal", "wave"]
    last = fresh_agent.call(os.getpid)
    assert fresh_agent.call(_modules_loaded, names) == []
    _spare(fresh_agent, last)  # forked before the preload: it has to be replaced
    fresh_agent.preload(["decimal"])
    assert fresh_agent.call(_modules_loaded, names) == ["decimal"]
    assert fresh_agent.call(_modules_loaded, names) == ["decimal"]  # the spare forked after it too


def test_preload_of_a_missing_module_names_it(fresh_agent: LocalAgent) -> None:
    with pytest.raises(RemoteError, match="no_such_module_for_microvm") as e:
        fresh_agent.preload(["wave", "no_such_module_for_microvm"])
    assert e.value.type_name == "ImportError"
    assert "ModuleNotFoundError" in e.value.remote_message and "wave" not in e.value.remote_message
    assert fresh_agent.call(_modules_loaded, ["wave"]) == ["wave"]  # what did import stays
    assert fresh_agent.call(abs, -2) == 2


def test_refresh_keeps_the_spare_which_reseeds_itself_when_its_call_comes(fresh_agent: LocalAgent) -> None:
    last = fresh_agent.call(os.getpid)
    spare = _spare(fresh_agent, last)
    done = _refresh(fresh_agent, os.urandom(16))
    assert done["ev"] == "done" and "boot_id" in done
    assert _live_children(fresh_agent.proc.pid) == {spare}  # no fork on the refresh's path
    assert fresh_agent.call(os.getpid) == spare
    assert _refresh(fresh_agent, b"")["ev"] == "done"  # no entropy: fine too


def test_a_call_process_reseeds_python_and_numpy_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    seeded: list[str] = []
    fake_numpy_random = types.SimpleNamespace(seed=lambda: seeded.append("numpy"))
    monkeypatch.setitem(sys.modules, "numpy.random", fake_numpy_random)
    random.seed(99)
    before = random.random()
    random.seed(99)
    identity.reseed_process()
    assert random.random() != before and seeded == ["numpy"]


def test_refresh_reseeds_random_and_sets_the_time_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process, with the clock and the ioctls replaced: nothing of the host changes.
    clock: list[tuple[int, int]] = []
    ioctls: list[tuple[int, bytes | None]] = []
    monkeypatch.setattr(identity.time, "clock_settime_ns", lambda which, ns: clock.append((which, ns)))
    monkeypatch.setattr(identity.fcntl, "ioctl", lambda fd, op, arg=None: ioctls.append((op, arg)))
    random.seed(1234)
    seeded = random.random()
    for time_ns in (0, None):
        random.seed(1234)
        identity.refresh(b"", time_ns)
        assert random.random() != seeded
    assert clock == [] and ioctls == []
    identity.refresh(b"\x01" * (identity.MAX_ENTROPY + 10), 1_700_000_000_000_000_000)
    assert clock == [(time.CLOCK_REALTIME, 1_700_000_000_000_000_000)]
    info = struct.pack("ii", identity.MAX_ENTROPY * 8, identity.MAX_ENTROPY) + b"\x01" * identity.MAX_ENTROPY
    assert ioctls == [(identity.RNDADDENTROPY, info), (identity.RNDRESEEDCRNG, None)]


# --- a hostile agent ----------------------------------------------------------------------


def _hostile(send: bytes, keep_open: bool = True) -> tuple[Session, socket.socket]:
    host, guest = socket.socketpair()
    session = Session(AgentClient(host), timeout=0.5)
    session.grace = 0.5
    guest.sendall(send)
    if not keep_open:
        guest.close()
    return session, guest


@pytest.mark.parametrize(("send", "why"), [
    (HEADER.pack(64 << 20), "broke the protocol: frame of 67108864 bytes announced"),
    (HEADER.pack(3) + b"\xc1\xc1\xc1", "broke the protocol: frame is not valid msgpack"),
])
def test_a_garbled_agent_ends_the_session_with_a_named_error(send: bytes, why: str) -> None:
    session, guest = _hostile(send)
    with pytest.raises(AgentError):  # "connection ended" or "is over", as the reader's race goes
        session.ping()
    assert session.client is not None and why in str(session.client.error)
    guest.close()


def test_an_agent_that_never_answers_is_a_timeout() -> None:
    session, guest = _hostile(b"")
    with pytest.raises(CallTimeout, match=r"did not answer within 0.5 s \(\+0.5 s\)"):
        session.call(abs, 1)
    guest.close()


def test_a_flood_nobody_reads_stays_bounded() -> None:
    flood = b"".join(encode({"id": 1, "ev": "out", "fd": 1, "data": b"x" * 1000}) for _ in range(1000))
    stray = b"".join(encode({"id": 99, "ev": "out", "fd": 1, "data": b"y"}) for _ in range(100))
    host, guest = socket.socketpair()
    client = AgentClient(host)
    channel = client.request("exec", argv=["true"])
    writer = threading.Thread(target=lambda: guest.sendall(stray + flood), daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while channel.events.qsize() < QUEUED_EVENTS:  # the reader fills the queue, then waits
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.dropped == 100  # events for no request came first: dropped, not kept
    for _ in range(20):  # and it stays full: nothing beyond the bound is taken in
        time.sleep(0.01)
        assert channel.events.qsize() == QUEUED_EVENTS
    assert writer.is_alive()  # the agent's sends block instead (the socket's buffers are full)
    got = sum(1 for _ in range(1000) if channel.next_event(5)["ev"] == "out")
    assert got == 1000
    writer.join(5)
    client.close()
    guest.close()
