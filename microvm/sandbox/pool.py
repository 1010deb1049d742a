"""Many sandboxes: a pool of ready VMs, and a concurrent.futures Executor over it.

    with microvm.Executor(max_workers=4) as ex:
        squares = list(ex.map(lambda x: x * x, range(100)))
        f = ex.submit(slow, 10); f.cancel()   # kills it in the guest, even while it runs

SandboxPool(size) boots `size` sandboxes in the background and hands them
out with acquire() / release() (or `with pool.sandbox() as sb:`). With
reuse=False (the default) every sandbox serves once: release() closes it
and a fresh one boots in its place, so each user gets a machine nobody has
touched. With reuse=True a healthy sandbox goes back to the pool (each call
still runs in its own forked process in the guest).

Executor(max_workers) runs each submitted call in a sandbox from such a
pool: by default the sandboxes are reused, like a process pool's workers
(fresh=True: a new VM per call). Its futures are CallFutures: cancel()
stops a running call in the guest, where the standard Future would refuse.
A boot that fails is raised by the acquire() (or the future) that waited
for it; a sandbox whose guest crashed is never handed out again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from microvm import checks
from microvm.errors import ConfigError, SandboxError
from microvm.sandbox.core import Sandbox
from microvm.sandbox.pickling import dumps_call
from microvm.sandbox.session import CallFuture


class SandboxPool:
    def __init__(self, size: int, *, reuse: bool = False,
                 from_snapshot: bool | str | os.PathLike[str] = False, preload: Sequence[str] = (),
                 **config: Any):
        """from_snapshot=True: boot one template sandbox (RAM forkable), import
        `preload` into its agent, and hand out forks of it (the template stays
        paused; each fork shares its memory copy-on-write). A snapshot
        directory (Sandbox.snapshot): hand out restores of it. Either way a
        sandbox starts with fresh entropy and the current time."""
        self.size = checks.integer("size", size, 1, 1024)
        self.reuse = reuse
        self.config = config
        self.preload = [str(m) for m in preload]
        if self.preload and from_snapshot is not True:
            raise ConfigError("preload= needs from_snapshot=True (modules are imported once, then forked)")
        self.from_snapshot = from_snapshot if from_snapshot is not False else None
        self._template: Sandbox | None = None
        self._template_lock = threading.Lock()
        self._ready: queue.Queue[Sandbox | BaseException] = queue.Queue()
        self._booting = concurrent.futures.ThreadPoolExecutor(self.size, thread_name_prefix="sandbox-boot")
        self._lock = threading.Lock()
        self._live: set[Sandbox] = set()
        self._closed = False
        self.image = config.get("image")
        # Resolved (built, or read from its path) once, before the first boot, for every sandbox.
        if self.image is None:
            from microvm.pyimage import python_image

            self.image = self.config["image"] = python_image()
        elif isinstance(self.image, str | os.PathLike):
            from microvm.pyimage import PythonImage

            self.image = self.config["image"] = PythonImage.load(Path(self.image))
        for _ in range(self.size):
            self._boot()

    def _boot(self) -> None:
        with self._lock:
            if self._closed:
                return
        self._booting.submit(self._boot_one)

    def _boot_one(self) -> None:
        try:
            sb = self._new_sandbox()
        except BaseException as e:
            self._ready.put(e)
            return
        with self._lock:
            closed = self._closed
            if not closed:
                self._live.add(sb)
        if closed:
            self._forget(sb)
            sb.close()
        else:
            self._ready.put(sb)

    def _new_sandbox(self) -> Sandbox:
        """A started sandbox: booted, forked from the template, or restored."""
        if self.from_snapshot is True:
            with self._template_lock:
                return self._template_sandbox().fork(1, resume=False)[0]
        if self.from_snapshot is not None:
            return Sandbox.restore(self.from_snapshot, **{k: v for k, v in self.config.items()
                                                          if k in ("timeout", "boot_timeout", "console", "force")})
        sb = Sandbox(**self.config)
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            self._live.add(sb)  # so that close() stops it while it boots
        try:
            return sb.start()
        except BaseException:
            self._forget(sb)
            raise

    def _template_sandbox(self) -> Sandbox:
        """The paused template the pool forks from; booted (and preloaded) by the first caller."""
        if self._template is None:
            with self._lock:
                if self._closed:
                    raise SandboxError("the sandbox pool is closed")
            template = Sandbox(**{**self.config, "forkable": True}).start()
            try:
                if self.preload:
                    template.preload(self.preload)
                template.vm.pause()
            except BaseException:
                template.close()
                raise
            self._template = template
        return self._template

    def _forget(self, sb: Sandbox) -> None:
        with self._lock:
            self._live.discard(sb)

    def acquire(self, timeout: float | None = None) -> Sandbox:
        """A ready sandbox (booting one if none is); a failed boot's error is raised here."""
        while True:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            try:
                item = self._ready.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no sandbox was ready within {timeout} s") from None
            if isinstance(item, BaseException):
                self._boot()  # try again for the next one
                raise item
            if not item.alive:  # crashed while it waited
                self._forget(item)
                item.close()
                self._boot()
                continue
            if not self.reuse:
                self._boot()  # its replacement starts now, while this one works
            return item

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until all `size` sandboxes have booted (or failed to: acquire() raises that)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._ready.qsize() < self.size:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self._ready.qsize()} of {self.size} sandboxes were ready within {timeout} s")
            time.sleep(0.05)

    def release(self, sb: Sandbox) -> None:
        if self.reuse and sb.alive and not self._closed:
            self._ready.put(sb)
            return
        self._forget(sb)
        sb.close()
        if self.reuse:
            self._boot()

    @contextlib.contextmanager
    def sandbox(self, timeout: float | None = None) -> Iterator[Sandbox]:
        sb = self.acquire(timeout)
        try:
            yield sb
        finally:
            self.release(sb)

    def close(self) -> None:
        """Close every sandbox, ready or in use, and stop booting."""
        with self._lock:
            self._closed = True
        self._booting.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            live = list(self._live)
            self._live.clear()
        for sb in live:
            sb.close()
        with self._template_lock:
            if self._template is not None:
                self._template.close()
                self._template = None

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Executor(concurrent.futures.Executor):
    """concurrent.futures.Executor whose calls run in sandboxes (see the module docstring)."""

    def __init__(self, max_workers: int | None = None, *, fresh: bool = False, **config: Any):
        workers = 4 if max_workers is None else checks.integer("max_workers", max_workers, 1, 1024)
        self.pool = SandboxPool(workers, reuse=not fresh, **config)
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox-call")
        self._pending: set[CallFuture] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> CallFuture:
        if self._shutdown:
            raise RuntimeError("cannot schedule new calls after shutdown")
        # An unpicklable function or argument is an error here, before any VM is touched.
        dumps_call(fn, args, kwargs, frozenset(getattr(self.pool.image, "modules", ())))
        future = CallFuture()
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)
        self._threads.submit(self._run, future, fn, args, kwargs)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _run(self, future: CallFuture, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        if future.cancelled():
            return
        try:
            sb = self.pool.acquire()
        except BaseException as e:
            if future.set_running_or_notify_cancel():
                future.set_exception(e)
            return
        try:
            future.run(sb, fn, args, kwargs)
        finally:
            self.pool.release(sb)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            with self._lock:
                pending = list(self._pending)
            for f in pending:
                if not f.running():
                    f.cancel()
        self._threads.shutdown(wait=wait)
        if wait:
            self.pool.close()
        else:
            threading.Thread(target=self._close_later, daemon=True).start()

    def _close_later(self) -> None:
        self._threads.shutdown(wait=True)
        self.pool.close()
