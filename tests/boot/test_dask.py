"""Sandboxed calls through Dask (microvm.dask): a LocalCluster of two worker
processes, each with its own pool of two sandboxes (the test venv's image).

Every assertion holds by construction, whatever the timing: a call's result
lives on the worker that ran it (nothing moves it), a VM belongs to the one
worker process that booted it, and a pool of two that reuses its sandboxes
never has more than two boot ids. How many of a worker's two VMs its calls
happened to use is the scheduler's and the clock's business: not asserted.
"""

from __future__ import annotations

import itertools
import json
import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import psutil
import pytest

from microvm.dask import SandboxPlugin, map, submit
from microvm.errors import SandboxError
from tests.boot.conftest import boots_here
from tests.support import pyenv

BOOT_ID = "/proc/sys/kernel/random/boot_id"
# The lane boots four VMs at once slowly (~90 s), and far more slowly when other lanes share the host.
BOOT_TIMEOUT = 300
TIMEOUT = BOOT_TIMEOUT + 60  # seconds for any one wait on the cluster


def square_and_boot_id(x: int) -> tuple[int, str]:
    """Runs in a guest: x * x and the guest kernel's boot id."""
    return x * x, Path(BOOT_ID).read_text().strip()


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def kvm_vms() -> int:
    """How many KVM VMs this process holds (its /proc/self/fd), run on a worker,
    once those closed are destroyed (teardown.py)."""
    from microvm import teardown

    teardown.drain(30.0)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vm"
        except OSError:
            pass  # the listing's own fd, closed since
    return count


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client | None]:
    if not boots_here():  # a PVM host: the tests' results come from the lane
        yield None
        return
    image = pyenv.test_image()  # built (or found cached) here, once, not by each worker
    # memory_limit=0: the VMs' RAM counts in their worker's memory; no limit to pause a worker at.
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=2, memory_limit=0,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        c.wait_for_workers(2, timeout=TIMEOUT)
        c.register_plugin(SandboxPlugin(size=2, image=image, mem_mib=256, boot_timeout=BOOT_TIMEOUT))
        pids = c.run(os.getpid)
        yield c
        _unregistering_the_plugin_closes_every_vm(c)
    # Every worker process has ended, and its VMs with it.
    assert [pid for pid in pids.values() if psutil.pid_exists(pid)] == []


def _unregistering_the_plugin_closes_every_vm(client: distributed.Client) -> None:
    """After the tests, in whatever order they ran: teardown(worker) closes each worker's pool."""
    workers = _workers(client)
    served = [submit(client, abs, -1, dask_options={"workers": [w]}) for w in workers]
    assert _gather(client, served) == [1, 1]  # so each worker holds a VM (reused)
    assert all(n >= 1 for n in client.run(kvm_vms).values())
    client.unregister_worker_plugin("microvm")
    assert client.run(kvm_vms) == {w: 0 for w in workers}
    with pytest.raises(SandboxError, match=r"register_plugin\(SandboxPlugin"):
        _gather(client, [submit(client, abs, -1)])


def _gather(client: distributed.Client, futures: list[distributed.Future]) -> list[Any]:
    """The futures' results; past TIMEOUT, a failure showing where each unfinished task stands."""
    try:
        distributed.wait(futures, timeout=TIMEOUT)
    except TimeoutError:
        pytest.fail(f"not done within {TIMEOUT} s; the running tasks' stacks, by worker:\n"
                    f"{client.call_stack(futures)}")
    return client.gather(futures)


def _workers(client: distributed.Client) -> list[str]:
    workers = sorted(client.scheduler_info()["workers"])
    assert len(workers) == 2
    return workers


def test_calls_spread_over_the_workers_each_on_its_own_vms(client: distributed.Client) -> None:
    workers = _workers(client)
    # Half where the scheduler likes, half pinned to each worker in turn (dask_options reach Dask).
    futures = map(client, square_and_boot_id, range(4))
    pinned = {i: w for i, w in zip(range(4, 8), itertools.cycle(workers), strict=False)}
    futures += [submit(client, square_and_boot_id, i, dask_options={"workers": [w]}) for i, w in pinned.items()]
    results = _gather(client, futures)
    where = {key: tuple(addrs) for key, addrs in client.who_has(futures).items()}  # the worker that ran it

    assert [square for square, _ in results] == [i * i for i in range(8)]
    ran_on = [where[f.key] for f in futures]
    assert all(len(addrs) == 1 and addrs[0] in workers for addrs in ran_on)
    assert [ran_on[i][0] for i in pinned] == list(pinned.values())  # so both workers served calls
    host_boot_id = Path(BOOT_ID).read_text().strip()
    vms: dict[str, set[str]] = {}  # boot id -> the workers whose calls it ran
    for (_, boot_id), (worker,) in zip(results, ran_on, strict=True):
        assert len(boot_id) == 36 and boot_id != host_boot_id  # a guest's, not this machine's
        vms.setdefault(boot_id, set()).add(worker)
    assert all(len(owners) == 1 for owners in vms.values())  # a VM lives in one worker
    for worker in workers:  # each worker's pool: two VMs at most, reused
        assert 1 <= sum(owners == {worker} for owners in vms.values()) <= 2


def test_futures_arguments_and_keyword_names_behave_as_client_submit(client: distributed.Client) -> None:
    first = submit(client, square_and_boot_id, 3)
    square = submit(client, operator.getitem, first, 0)  # a Future argument: its value, once ready
    # fn's own keyword arguments may be named like client.submit's options.
    named = submit(client, echo, square, key="k", workers=2, pure=None, retries="r")
    assert _gather(client, [named]) == [((9,), {"key": "k", "workers": 2, "pure": None, "retries": "r"})]


def test_a_calls_exception_comes_back_as_its_own_type(client: distributed.Client) -> None:
    future = submit(client, json.loads, "{")
    with pytest.raises(json.JSONDecodeError, match="Expecting property name") as info:
        _gather(client, [future])
    assert any("--- guest traceback ---" in note for note in getattr(info.value, "__notes__", ()))
    assert future.status == "error"
