"""AsyncSandbox: the Sandbox for asyncio code.

    async with AsyncSandbox(mem_mib=256) as sb:
        value = await sb.call(fn, 1, 2)
        done = await sb.exec(["make", "test"])

Each operation runs the blocking Sandbox method in a worker thread
(asyncio.to_thread), so the event loop never waits on the VM. Cancelling
the awaiting task (asyncio.timeout, task.cancel()) kills the call in the
guest, as CallFuture.cancel() does.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from microvm.errors import MicroVMError
from microvm.sandbox.client import Channel
from microvm.sandbox.core import Sandbox


class AsyncSandbox:
    def __init__(self, **config: Any):
        self.sandbox = Sandbox(**config)

    async def start(self) -> AsyncSandbox:
        await asyncio.to_thread(self.sandbox.start)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self.sandbox.close)

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def boot_id(self) -> str:
        return self.sandbox.boot_id

    async def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return await self.call_with(fn, args, kwargs)

    async def call_with(self, fn: Callable[..., Any], args: Sequence[Any] = (),
                        kwargs: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        channels: list[Channel] = []
        try:
            return await asyncio.to_thread(self.sandbox.call_with, fn, args, kwargs, timeout=timeout,
                                           on_start=channels.append)
        except asyncio.CancelledError:
            for channel in channels:  # the thread goes on until the guest confirms the kill
                with contextlib.suppress(MicroVMError):
                    channel.kill()
            raise

    async def exec(self, argv: Sequence[str], **options: Any) -> subprocess.CompletedProcess[bytes]:
        return await asyncio.to_thread(self.sandbox.exec, argv, **options)

    async def put(self, source: bytes | str | Path, dest: str, **options: Any) -> None:
        await asyncio.to_thread(self.sandbox.put, source, dest, **options)

    async def get(self, source: str, dest: str | Path | None = None) -> bytes | None:
        return await asyncio.to_thread(self.sandbox.get, source, dest)
