"""Sandboxed calls on more than one host, through Dask (distributed).

    import microvm.dask as sandboxed      # its map() is client.map's, not the builtin

    client.register_plugin(sandboxed.SandboxPlugin(size=2, mem_mib=256))
    future = sandboxed.submit(client, fn, 1, 2, dask_options={"retries": 1})  # a distributed Future
    future.result()                                                           # fn(1, 2), run in a VM

SandboxPlugin gives each Dask worker its own SandboxPool(size, reuse=True,
**config) (fresh=True: reuse=False), made in setup(worker) and closed in
teardown(worker) (when the worker closes or the plugin is unregistered).
submit() and map() are client.submit() and client.map() for a task that, on
whichever worker the scheduler picks, takes a sandbox from that worker's
pool, runs fn(*args, **kwargs) in it with Sandbox.call_with, and puts the
sandbox back. Dask does all the scheduling: futures, dependencies (a Future
among the arguments is resolved first, as with client.submit), retries,
resources, cancelling what has not started. A call already running in a
guest runs on when its future is cancelled (Dask cannot interrupt a running
task): give it a timeout. A worker without the plugin fails the task with a
SandboxError naming client.register_plugin(SandboxPlugin(...)).

The sandbox's PythonImage is resolved on each worker: without image=, a
worker builds (once, then cached) the image of its own Python environment,
so the guest unpickles what that worker unpickles; with image=PATH (a
manifest or .ext4 that exists on every worker, e.g. on a shared filesystem)
or a PythonImage, every worker boots that image.

The VMs run inside the worker's process: their RAM (size x mem_mib) counts
in the worker's memory, which Dask watches against its memory_limit. A
worker with more threads than sandboxes makes the extra tasks wait for one.

distributed is an optional dependency (pip install 'microvm[dask]'); no
other part of microvm imports it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

try:
    import distributed
except ModuleNotFoundError as e:
    if e.name != "distributed":
        raise
    raise ImportError("microvm.dask needs distributed (Dask): pip install 'microvm[dask]'", name=__name__) from None
from dask.base import tokenize
from dask.utils import funcname

from microvm import checks
from microvm.errors import ConfigError, SandboxError
from microvm.sandbox.core import Sandbox
from microvm.sandbox.pool import SandboxPool

DEFAULT_NAME = "microvm"
# client.submit's own options that make sense for a sandboxed call (actor= does not).
SUBMIT_OPTIONS = frozenset({"key", "workers", "resources", "retries", "priority", "fifo_timeout",
                            "allow_other_workers", "pure"})
MAP_OPTIONS = SUBMIT_OPTIONS | {"batch_size"}
SANDBOX_OPTIONS = frozenset({"plugin", "timeout"})


class SandboxPlugin(distributed.WorkerPlugin):
    """A SandboxPool of `size` sandboxes on each worker, registered under `name`.

    config: Sandbox's options (image, mem_mib, vcpus, timeout, ...), checked
    here on the client, used on each worker. fresh=True: a new VM for every
    call (the pool's reuse=False); by default a healthy sandbox serves again
    (each call still runs in its own fresh process in the guest).
    """

    def __init__(self, size: int = 2, *, name: str = DEFAULT_NAME, fresh: bool = False, **config: Any):
        self.size = checks.integer("size", size, 1, 1024)
        if not isinstance(name, str) or not name:
            raise ConfigError("name must be a non-empty string")
        try:
            inspect.signature(Sandbox).bind(**config)
        except TypeError as e:
            raise ConfigError(f"SandboxPlugin: {e} (the options are Sandbox's)") from None
        self.name = name
        self.fresh = fresh
        self.config = config
        self.pool: SandboxPool | None = None  # on a worker, once set up
        self.setup_error: BaseException | None = None

    async def setup(self, worker: distributed.Worker) -> None:
        # Off the event loop: resolving the image may build it (minutes, the first time).
        try:
            self.pool = await asyncio.to_thread(self._new_pool)
        except Exception as e:
            self.setup_error = e
            raise

    def _new_pool(self) -> SandboxPool:
        config = dict(self.config)
        if isinstance(config.get("image"), str | os.PathLike):
            from microvm.pyimage import PythonImage

            config["image"] = PythonImage.load(config["image"])  # a path missing here fails the registration
        # The pool resolves image=None to this worker's own environment's image.
        return SandboxPool(self.size, reuse=not self.fresh, **config)

    async def teardown(self, worker: distributed.Worker) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await asyncio.to_thread(pool.close)  # waits for boots under way and kills every VM

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "pool": None, "setup_error": None}  # a worker's pool stays on it


def submit(client: distributed.Client, fn: Callable[..., Any], /, *args: Any,
           dask_options: Mapping[str, Any] | None = None, sandbox_options: Mapping[str, Any] | None = None,
           **kwargs: Any) -> distributed.Future:
    """client.submit(fn, *args, **kwargs), with fn run in a sandbox on the worker; a distributed Future.

    dask_options: client.submit's own options (key, workers, resources,
    retries, priority, fifo_timeout, allow_other_workers, pure; pure is
    False unless given), kept apart so that fn's keyword arguments may have
    any name. sandbox_options: plugin (the SandboxPlugin's name, default
    "microvm"), timeout (this call's, default the sandbox's).
    """
    options = _dask_options(dask_options, SUBMIT_OPTIONS)
    plugin, timeout = _sandbox_options(sandbox_options)
    if options.get("key") is None:
        unique = tokenize(fn, args, kwargs, plugin, timeout) if options.get("pure") else uuid.uuid4()
        options["key"] = f"{funcname(fn)}-{unique}"
    return client.submit(_call, plugin, fn, args, kwargs, timeout, **options)


def map(client: distributed.Client, fn: Callable[..., Any], /, *iterables: Collection[Any],
        dask_options: Mapping[str, Any] | None = None, sandbox_options: Mapping[str, Any] | None = None,
        **kwargs: Any) -> list[distributed.Future]:
    """client.map(fn, *iterables, **kwargs), each call in a sandbox; a list of distributed Futures.

    The options are submit()'s, and client.map's batch_size; key is a prefix
    (default fn's name) or a list of keys.
    """
    options = _dask_options(dask_options, MAP_OPTIONS)
    plugin, timeout = _sandbox_options(sandbox_options)
    options["key"] = options.get("key") or funcname(fn)
    return client.map(_call_mapped, *iterables, microvm_call=(plugin, fn, kwargs, timeout), **options)


def worker_pool(name: str = DEFAULT_NAME) -> SandboxPool:
    """The SandboxPool of the Dask worker running this task (for tasks of your own)."""
    try:
        worker = distributed.get_worker()
    except ValueError:
        raise SandboxError("a sandboxed Dask task runs on a Dask worker: submit it with microvm.dask.submit"
                           ) from None
    plugin = worker.plugins.get(name)
    if not isinstance(plugin, SandboxPlugin):
        what = "no worker plugin" if plugin is None else f"a {type(plugin).__name__}, not a SandboxPlugin,"
        raise SandboxError(f"Dask worker {worker.address} has {what} named {name!r}: "
                           f"run client.register_plugin(SandboxPlugin(name={name!r}, ...)) first")
    if plugin.pool is None:
        why = f": {plugin.setup_error!r}" if plugin.setup_error is not None else " (not set up, or torn down)"
        raise SandboxError(f"Dask worker {worker.address}'s SandboxPlugin {name!r} has no sandbox pool{why}")
    return plugin.pool


def _call(plugin: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
          timeout: float | None) -> Any:
    """The task, on the worker: fn(*args, **kwargs) in a sandbox of this worker's pool."""
    with worker_pool(plugin).sandbox() as sb:
        return sb.call_with(fn, args, kwargs, timeout=timeout)


def _call_mapped(*args: Any, microvm_call: tuple[str, Callable[..., Any], dict[str, Any], float | None]) -> Any:
    plugin, fn, kwargs, timeout = microvm_call
    return _call(plugin, fn, args, kwargs, timeout)


def _options(given: Mapping[str, Any] | None, allowed: frozenset[str], what: str) -> dict[str, Any]:
    options = dict(given or {})
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return options


def _dask_options(given: Mapping[str, Any] | None, allowed: frozenset[str]) -> dict[str, Any]:
    return {"pure": False, **_options(given, allowed, "dask_options")}


def _sandbox_options(given: Mapping[str, Any] | None) -> tuple[str, float | None]:
    options = _options(given, SANDBOX_OPTIONS, "sandbox_options")
    plugin = options.get("plugin", DEFAULT_NAME)
    if not isinstance(plugin, str) or not plugin:
        raise ConfigError("sandbox_options: plugin must be a SandboxPlugin's name")
    return plugin, checks.timeout(options.get("timeout"), "sandbox_options timeout")
