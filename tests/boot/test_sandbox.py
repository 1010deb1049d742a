"""Sandboxes in real guests: calls, commands, files, cancel, crashes, many at once.

The guests run the small test venv's image (tests/support/pyenv.py); the
agent reaches them over virtio-vsock. On a PVM host the whole file runs in
the lane (tests/boot/conftest.py), with 2 vCPUs and 4 GiB.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.sandbox import AsyncSandbox, Executor, Sandbox, SandboxCrashed, SandboxPool
from tests.boot.conftest import boots_here
from tests.support import pyenv

pytestmark = pytest.mark.boot


def module_function(x: int) -> tuple[int, str]:
    """Defined in a test module, which the guest does not have: it travels by value."""
    return x * 2, Path("/proc/sys/kernel/random/boot_id").read_text().strip()


class GuestError(Exception):
    pass


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.fixture(scope="module")
def image():  # type: ignore[no-untyped-def]
    return pyenv.test_image()


@pytest.fixture(scope="module")
def sb(image) -> Iterator[Sandbox | None]:  # type: ignore[no-untyped-def]
    if not boots_here():  # a PVM host: the test's result comes from the lane
        yield None
        return
    with Sandbox(image=image, mem_mib=512, timeout=120) as sandbox:
        yield sandbox


def test_lambda_closure_and_module_function(sb: Sandbox) -> None:
    factor = 3
    assert sb.call(lambda a, b: a + b, 2, 40) == 42
    assert sb.call(lambda x: x * factor, 5) == 15
    doubled, guest_boot = sb.call(module_function, 21)
    assert doubled == 42
    assert guest_boot == sb.boot_id != boot_id()  # it ran in the guest, not here


def test_the_guest_has_entropy_from_the_host(sb: Sandbox) -> None:
    current = sb.exec(["cat", "/sys/devices/virtual/misc/hw_random/rng_current"]).stdout
    assert current.startswith(b"virtio_rng")
    assert len(sb.exec(["head", "-c", "64", "/dev/hwrng"]).stdout) == 64
    assert sb.vm.devices.stats()["rng"]["bytes"] >= 64
    assert sb.call(os.urandom, 16) != sb.call(os.urandom, 16)


def test_a_guest_exception_is_its_own_type_with_the_guest_traceback(sb: Sandbox) -> None:
    def fail(n: int) -> None:
        raise GuestError(f"failed with {n}")

    with pytest.raises(GuestError, match="failed with 7") as info:
        sb.call(fail, 7)
    notes = "".join(getattr(info.value, "__notes__", []))
    assert "guest traceback" in notes and 'in fail' in notes


def test_a_thousand_calls_in_one_sandbox(sb: Sandbox) -> None:
    assert [sb.call(abs, -i) for i in range(1000)] == list(range(1000))


def test_streamed_output_comes_in_order_before_the_command_ends(sb: Sandbox) -> None:
    stream = sb.exec_stream(["sh", "-c", "for i in 1 2 3; do echo line$i; done; "
                                         "while [ ! -e /tmp/gate ]; do sleep 0.05; done; echo after"])
    chunks = iter(stream)
    seen = b""
    while seen.count(b"\n") < 3:
        fd, data = next(chunks)
        assert fd == 1
        seen += data
    assert seen == b"line1\nline2\nline3\n"
    assert sb.exec(["test", "-e", "/tmp/gate"]).returncode == 1  # the command is still waiting
    sb.put(b"", "/tmp/gate")
    assert b"".join(d for _, d in chunks) == b"after\n"
    assert stream.returncode == 0


def test_a_100_mib_file_round_trip(sb: Sandbox, tmp_path: Path) -> None:
    blob = os.urandom(100 << 20)
    src, back = tmp_path / "blob", tmp_path / "back"
    src.write_bytes(blob)
    sb.put(src, "/tmp/blob")
    guest_sum = sb.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0].decode()
    sb.get("/tmp/blob", back)
    sb.exec(["rm", "/tmp/blob"])
    assert guest_sum == hashlib.sha256(blob).hexdigest() == hashlib.sha256(back.read_bytes()).hexdigest()


def test_cancel_stops_a_running_call_and_its_process_is_gone(sb: Sandbox) -> None:
    def linger() -> None:
        Path("/tmp/linger.pid").write_text(str(os.getpid()))
        time.sleep(600)

    future = sb.submit(linger)
    deadline = time.monotonic() + 60
    while sb.exec(["cat", "/tmp/linger.pid"]).returncode != 0:
        if future.done():
            pytest.fail(f"the call ended before it was cancelled: {future.exception()!r}")
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pid = sb.exec(["cat", "/tmp/linger.pid"]).stdout.decode()
    assert sb.exec(["test", "-d", f"/proc/{pid}"]).returncode == 0
    assert future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(60)
    assert future.cancelled()
    assert sb.exec(["test", "-d", f"/proc/{pid}"]).returncode == 1  # killed and reaped
    assert sb.call(abs, -1) == 1


def test_async_sandbox(image) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[int, bytes]:
        async with AsyncSandbox(image=image) as asb:
            value, done = await asyncio.gather(asb.call(pow, 2, 10), asb.exec(["echo", "hi"]))
            return value, done.stdout

    assert asyncio.run(main()) == (1024, b"hi\n")


def test_a_guest_panic_mid_call_is_sandbox_crashed(image) -> None:  # type: ignore[no-untyped-def]
    def panic() -> None:
        Path("/proc/sys/vm/panic_on_oom").write_text("1")
        hog = []
        while True:
            hog.append(bytearray(16 << 20))

    with Sandbox(image=image, mem_mib=192, timeout=120) as sandbox:
        assert sandbox.call(abs, -5) == 5
        with pytest.raises(SandboxCrashed, match=r"(?s)panicked.*console tail.*Out of memory"):
            sandbox.call(panic)
        with pytest.raises(SandboxCrashed):
            sandbox.call(abs, -5)  # and every later call


def test_eight_sandboxes_through_the_executor(image) -> None:  # type: ignore[no-untyped-def]
    def slow_boot_id(i: int) -> tuple[int, str]:
        time.sleep(2)
        return i, boot_id()

    # Eight boots at once share the lane's one emulated CPU: minutes, not seconds.
    with Executor(max_workers=8, image=image, mem_mib=192, boot_timeout=900) as ex:
        pool: SandboxPool = ex.pool
        pool.wait_ready(900)  # then each of the 8 calls takes one of them (first in, first out)
        results = list(ex.map(slow_boot_id, range(8), timeout=900))
        live = [sb for sb in list(pool._live) if sb.alive]
        assert len(live) == 8  # all eight up at once, each its own VM
    assert [i for i, _ in results] == list(range(8))
    assert len({b for _, b in results}) == 8
    assert {b for _, b in results} == {sb.boot_id for sb in live}
    assert not any(sb.alive or sb.vm.vm is not None for sb in live)  # shutdown closed every VM


def test_a_killed_agent_is_sandbox_crashed(image) -> None:  # type: ignore[no-untyped-def]
    with Sandbox(image=image, mem_mib=192, timeout=120) as sandbox:
        agent = sandbox.ping()["pid"]
        with pytest.raises(SandboxCrashed, match="connection ended"):
            sandbox.exec(["kill", "-9", str(agent)])
        with pytest.raises(SandboxCrashed):
            sandbox.call(abs, -5)
