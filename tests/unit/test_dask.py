"""microvm.dask without a VM: distributed stays optional (nothing else imports
it; without it, the module names the extra), a worker without the plugin
says how to register it, and bad options are refused before Dask sees them.
The sandboxed calls themselves: tests/boot/test_dask.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import distributed
import pytest

from microvm.dask import SandboxPlugin, map, submit
from microvm.errors import ConfigError, SandboxError
from microvm.images import ImageError

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_microvm_and_its_sandbox_never_import_distributed() -> None:
    proc = _python("import sys, microvm, microvm.sandbox, microvm.pyimage; microvm.Sandbox; microvm.Executor; "
                   "print(sorted({m.split('.')[0] for m in sys.modules} & {'distributed', 'dask'}))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"


def test_without_distributed_the_module_names_the_extra() -> None:
    # None in sys.modules: `import distributed` fails as where it is not installed.
    proc = _python("import sys; sys.modules['distributed'] = None; import microvm.dask")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == \
        "ImportError: microvm.dask needs distributed (Dask): pip install 'microvm[dask]'"


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    """One in-process worker (no KVM needed: no plugin, so no VM)."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) \
            as cluster, distributed.Client(cluster) as c:
        yield c


def test_a_worker_without_the_plugin_says_how_to_register_it(client: distributed.Client) -> None:
    future = submit(client, abs, -1)
    with pytest.raises(SandboxError, match=r"has no worker plugin named 'microvm': run "
                                           r"client\.register_plugin\(SandboxPlugin\(name='microvm', \.\.\.\)\)"):
        future.result(timeout=60)
    [future] = map(client, abs, [-1], sandbox_options={"plugin": "other"})
    with pytest.raises(SandboxError, match=r"no worker plugin named 'other'.*SandboxPlugin\(name='other'"):
        future.result(timeout=60)


def test_an_image_path_a_worker_lacks_fails_the_registration(client: distributed.Client, tmp_path: Path) -> None:
    missing = tmp_path / "python-none.json"
    with pytest.raises(ImageError, match="cannot read the python image manifest"):
        client.register_plugin(SandboxPlugin(name="broken", image=missing))
    try:  # the worker keeps the plugin; its tasks say why it has no pool
        future = submit(client, abs, -1, sandbox_options={"plugin": "broken"})
        with pytest.raises(SandboxError, match=r"SandboxPlugin 'broken' has no sandbox pool: ImageError"):
            future.result(timeout=60)
    finally:
        client.unregister_worker_plugin("broken")


def test_futures_are_named_after_the_function_and_never_shared(client: distributed.Client) -> None:
    a, b = submit(client, abs, -1), submit(client, abs, -1)
    assert a.key.startswith("abs-") and a.key != b.key  # pure=False: the same call runs twice
    assert [f.key.startswith("abs-") for f in map(client, abs, [1, 2])] == [True, True]
    assert submit(client, abs, -1, dask_options={"key": "mine"}).key == "mine"
    client.cancel([a, b])


def test_bad_options_are_refused_on_the_client(client: distributed.Client) -> None:
    with pytest.raises(ConfigError, match=r"dask_options: unknown option\(s\) actor "):
        submit(client, abs, -1, dask_options={"actor": True})
    with pytest.raises(ConfigError, match=r"sandbox_options: unknown option\(s\) mem_mib "):
        submit(client, abs, -1, sandbox_options={"mem_mib": 64})
    with pytest.raises(ConfigError, match="sandbox_options timeout must be finite"):
        map(client, abs, [1], sandbox_options={"timeout": 0})
    with pytest.raises(ConfigError, match="size must be between 1 and 1024"):
        SandboxPlugin(size=0)
    with pytest.raises(ConfigError, match=r"memory.*the options are Sandbox's"):
        SandboxPlugin(memory=256)


def test_the_plugin_travels_without_its_pool() -> None:
    import pickle

    plugin = SandboxPlugin(size=3, name="big", mem_mib=512)
    plugin.pool = object()  # type: ignore[assignment]  # as on a worker
    copy = pickle.loads(pickle.dumps(plugin))
    assert (copy.name, copy.size, copy.config, copy.pool) == ("big", 3, {"mem_mib": 512}, None)
