"""microvm's pytest plugin with real VMs: the sample suite (tests/support/pytest_sample/)
run with the plugin reads like a run without it, each marked test in a VM of its own.

One VM per marked test, four in all: in the lane each costs ~20 s (boot, then
pytest's start in the guest). A guest that ends under a test, and one that
overstays, are tested through a host-side agent (tests/unit/test_pytest_plugin.py);
what a real guest's end raises (SandboxCrashed) is tests/boot/test_sandbox.py's."""

from __future__ import annotations

import pytest

from microvm.pyimage import PythonImage
from tests.support import pyenv, pytest_runs

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def image() -> PythonImage:
    # A fixture, so that on a PVM host it is built on the host, before the lane (which finds it cached).
    return pyenv.test_image()


@pytest.fixture
def sample(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    # pytester gives HOME a directory of its own: keep microvm's cache (the kernel) where it is.
    monkeypatch.setenv("MICROVM_CACHE", str(pyenv.USER_CACHE))
    pytest_runs.copy_sample(pytester.path)
    return pytester


def test_marked_tests_run_in_vms_and_read_as_if_run_here(sample: pytest.Pytester, image: PythonImage) -> None:
    here = sample.runpytest_inprocess("-p", "no:microvm", "-rA", "--junitxml=here.xml", "sample_outcomes.py")
    there = sample.runpytest_inprocess("-rA", f"--microvm-image={image.manifest}", "--junitxml=there.xml",
                                       "sample_outcomes.py")
    for run in (here, there):
        run.stdout.fnmatch_lines([f"*= {pytest_runs.SUMMARY} in *"])
    assert pytest_runs.sections(there.outlines) == pytest_runs.sections(here.outlines)

    with open("/proc/sys/kernel/random/boot_id") as f:
        own_boot_id = f.read().strip()
    local = pytest_runs.junit_cases(sample.path / "here.xml")
    assert {props["boot_id"] for _, props in local.values()} == {own_boot_id}
    cases = pytest_runs.junit_cases(sample.path / "there.xml")
    assert {name: outcome for name, (outcome, _) in cases.items()} == pytest_runs.OUTCOMES
    # Each test saw the boot id of the VM the plugin booted for it, and no two the same.
    boot_ids = [props["boot_id"] for _, props in cases.values()]
    assert [props["microvm_boot_id"] for _, props in cases.values()] == boot_ids
    assert len(set(boot_ids)) == len(boot_ids) and own_boot_id not in boot_ids

