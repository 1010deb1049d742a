"""microvm's pytest plugin (entry point pytest11 `microvm`): sandboxes for tests.

    def test_in_a_sandbox(sandbox):              # a fresh Sandbox, closed after the test
        assert sandbox.call(sum, [1, 2]) == 3

    @pytest.mark.sandbox(mem_mib=512)            # the fixture's size, for this test
    def test_bigger(sandbox): ...

    @pytest.mark.microvm(mem_mib=512, vcpus=2, timeout=60)
    def test_runs_in_its_own_vm(): ...           # the test itself runs in a fresh VM

A test marked microvm runs in a VM of its own, from a copy of the rootdir
(crossing.py says what crosses), and its reports come back to this run
(remote.py); unmarked tests are untouched. The image: --microvm-image (a
PythonImage manifest or .ext4), else --microvm-venv (built once from that
venv), else this Python's own environment (python_image()); each is also
an ini option and an environment variable (options.py).

Loaded by every pytest run where microvm is installed, so importing it
costs nothing: no KVM, no image, no sandbox until a test asks for one, and
a setting is read only then (`-p no:microvm` turns the plugin off).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from microvm.pytest_plugin.guest import GUEST_ENV, MARKERS
from microvm.pytest_plugin.options import Settings, VMConfig, add_options, read_settings, vm_config
from microvm.pytest_plugin.remote import GUEST_DIR, GUEST_MODULE, run_marked

if TYPE_CHECKING:
    from microvm.pyimage import PythonImage
    from microvm.sandbox import Sandbox

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    config.stash[STATE] = State(config)


class State:
    """One run's settings, image and rootdir tar, each made at first need; a failure
    is kept and raised again for every later test, not retried."""

    guest_dir = GUEST_DIR  # where a marked test's files go in its VM

    def __init__(self, config: pytest.Config):
        self.config = config
        self._made: dict[str, Any] = {}

    def _once(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._made:
            try:
                self._made[key] = (True, make())
            except Exception as e:
                self._made[key] = (False, e)
        ok, value = self._made[key]
        if not ok:
            raise value
        return value

    def settings(self) -> Settings:
        return self._once("settings", lambda: read_settings(self.config))

    def image(self) -> PythonImage:
        def make() -> PythonImage:
            from microvm.pyimage import PythonImage, python_image

            s = self.settings()
            if s.image is not None:
                return PythonImage.load(s.image)
            return python_image(venv=s.venv)

        return self._once("image", make)

    def payload(self) -> bytes:
        """The tar a marked test's VM gets: the rootdir's files and the guest plugin."""
        def make() -> bytes:
            from importlib import resources

            from microvm.pytest_plugin import crossing  # tarfile: only when a test is marked

            s = self.settings()
            guest = resources.files("microvm.pytest_plugin").joinpath("guest.py").read_bytes()
            entries = crossing.select(self.config.rootpath, s.exclude, s.max_upload)
            return crossing.pack(entries, {f"{GUEST_MODULE}.py": guest})

        return self._once("payload", make)

    def start_sandbox(self, vm: VMConfig) -> Sandbox:
        from microvm.sandbox import Sandbox

        return Sandbox(image=self.image(), mem_mib=vm.mem_mib, vcpus=vm.vcpus, timeout=vm.timeout).start()


STATE = pytest.StashKey[State]()


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A fresh Sandbox for this test (its size: @pytest.mark.sandbox(mem_mib=, vcpus=, timeout=),
    else the ini options), closed after it."""
    from microvm.errors import MicroVMError

    state = request.config.stash[STATE]
    try:
        sb = state.start_sandbox(vm_config(request.node, "sandbox", state.settings()))
    except (MicroVMError, ValueError, pytest.UsageError) as e:
        pytest.fail(f"microvm: cannot start the sandbox: {type(e).__name__}: {e}", pytrace=False)
    try:
        yield sb
    finally:
        sb.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if (item.get_closest_marker("microvm") is None or item.config.getoption("microvm_local")
            or os.environ.get(GUEST_ENV) == "1"):  # never again from inside a test's VM
        return None
    run_marked(item, nextitem, item.config.stash[STATE])
    return True
