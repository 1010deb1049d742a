"""microvm's pytest plugin without KVM: its settings, what crosses into a VM,
and a marked test's round trip through an agent running on the host (a
Session stand-in for a Sandbox: tests/support/local_agent.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest

import microvm.pytest_plugin as plugin
from microvm.pytest_plugin import crossing
from microvm.pytest_plugin.options import DEFAULT_MEM_MIB, VMConfig, read_settings, vm_config
from tests.support import pytest_runs
from tests.support.local_agent import LocalAgent

pytest_plugins = ["pytester"]

ENV_NAMES = ("MICROVM_SANDBOX_IMAGE", "MICROVM_SANDBOX_VENV", "MICROVM_SANDBOX_MEM_MIB", "MICROVM_SANDBOX_VCPUS",
             "MICROVM_SANDBOX_TIMEOUT", "MICROVM_SANDBOX_MAX_UPLOAD_MIB")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


# --- settings ---------------------------------------------------------------------------


def test_settings_command_line_over_ini_over_environment(pytester: pytest.Pytester,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nmicrovm_venv = envs/a\nmicrovm_mem_mib = 300\nmicrovm_exclude =\n    data\n    *.log\n")
    monkeypatch.setenv("MICROVM_SANDBOX_MEM_MIB", "512")
    monkeypatch.setenv("MICROVM_SANDBOX_VCPUS", "2")
    s = read_settings(pytester.parseconfig())
    assert (s.image, s.venv) == (None, pytester.path / "envs/a")  # an ini path is relative to the ini file
    assert (s.mem_mib, s.vcpus, s.timeout) == (300, 2, None)
    assert s.exclude == ("data", "*.log")
    assert s.max_upload == 64 << 20

    s = read_settings(pytester.parseconfig("--microvm-image", "img.json"))
    assert (s.image, s.venv) == (pytester.path / "img.json", None)  # the command line beats the ini file


def test_settings_defaults_and_environment(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    s = read_settings(pytester.parseconfig())
    assert (s.image, s.venv, s.mem_mib, s.vcpus, s.timeout) == (None, None, DEFAULT_MEM_MIB, 1, None)
    monkeypatch.setenv("MICROVM_SANDBOX_VENV", "/opt/venv")
    monkeypatch.setenv("MICROVM_SANDBOX_TIMEOUT", "90")
    s = read_settings(pytester.parseconfig())
    assert (s.venv, s.timeout) == (Path("/opt/venv"), 90.0)


@pytest.mark.parametrize(("ini", "env", "message"), [
    ("", {"MICROVM_SANDBOX_MEM_MIB": "lots"}, "$MICROVM_SANDBOX_MEM_MIB must be a number, got 'lots'"),
    ("microvm_vcpus = 0", {}, "ini option microvm_vcpus: vcpus must be between 1 and 254, got 0"),
    ("microvm_timeout = -1", {}, "ini option microvm_timeout: timeout must be finite and above 0"),
    ("microvm_image = a.json\nmicrovm_venv = v", {},
     "ini option microvm_image and ini option microvm_venv both choose the sandboxes' image: give one"),
])
def test_settings_refuse_bad_values(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ini: str,
                                    env: dict[str, str], message: str) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pytest.UsageError) as e:
        read_settings(pytester.parseconfig())
    assert message in str(e.value)


def test_marker_keywords_closest_first(pytester: pytest.Pytester) -> None:
    items = pytester.getitems("""
        import pytest
        pytestmark = pytest.mark.microvm(mem_mib=512, timeout=30)

        @pytest.mark.microvm(vcpus=2, timeout=5)
        def test_a(): pass

        @pytest.mark.microvm(memory=1)
        def test_b(): pass
    """)
    settings = read_settings(items[0].config)
    assert vm_config(items[0], "microvm", settings) == VMConfig(mem_mib=512, vcpus=2, timeout=5.0)
    with pytest.raises(ValueError, match=r"@pytest.mark.microvm has no keyword memory \(it takes mem_mib"):
        vm_config(items[1], "microvm", settings)


# --- what crosses -----------------------------------------------------------------------


def _tree(root: Path) -> None:
    files = {"pytest.ini": "[pytest]\n", "test_a.py": "x", "pkg/mod.py": "y", "pkg/data/blob.bin": "z" * 100,
             ".git/HEAD": "ref", "pkg/__pycache__/mod.pyc": "c", "node_modules/x.js": "j",
             "myenv/pyvenv.cfg": "home = /usr", "myenv/lib/site.py": "s", "logs/run.log": "l", "top.log": "l"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "link_to_file").symlink_to("pkg/mod.py")
    (root / "link_to_dir").symlink_to("pkg")
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")


def test_what_crosses(tmp_path: Path) -> None:
    _tree(tmp_path)
    entries = crossing.select(tmp_path, exclude=["*.log"])
    assert [e.relpath for e in entries] == ["link_to_file", "pkg/data/blob.bin", "pkg/mod.py", "pytest.ini",
                                            "test_a.py"]
    assert [e.relpath for e in crossing.select(tmp_path, exclude=["pkg/data", "link_*"])] == [
        "logs/run.log", "pkg/mod.py", "pytest.ini", "test_a.py", "top.log"]

    with tarfile.open(fileobj=BytesIO(crossing.pack(entries, {"guest.py": b"g"}))) as tar:
        assert tar.getnames() == ["root/link_to_file", "root/pkg/data/blob.bin", "root/pkg/mod.py",
                                  "root/pytest.ini", "root/test_a.py", "lib/guest.py"]
        link = tar.getmember("root/link_to_file")
        assert link.isfile() and tar.extractfile(link).read() == b"y"  # type: ignore[union-attr]


def test_too_much_to_cross_names_the_largest(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "pkg" / "data" / "big.bin").write_bytes(b"\0" * (3 << 20))
    with pytest.raises(crossing.CrossingError) as e:
        crossing.select(tmp_path, limit=2 << 20)
    assert str(e.value).startswith(f"the rootdir {tmp_path} holds 3.0 MiB of files to ship into the VM, over "
                                   f"the limit of 2.0 MiB (ini option microvm_max_upload_mib); the largest: "
                                   f"pkg/ (3.0 MiB),")
    assert "microvm_exclude" in str(e.value)


# --- the plugin in a pytest run -------------------------------------------------------------


@pytest.fixture
def no_sandboxes(monkeypatch: pytest.MonkeyPatch) -> list[VMConfig]:
    asked: list[VMConfig] = []

    def refuse(self: plugin.State, vm: VMConfig) -> None:
        asked.append(vm)
        raise AssertionError("no sandbox here")

    monkeypatch.setattr(plugin.State, "start_sandbox", refuse)
    return asked


def test_unmarked_tests_are_untouched(pytester: pytest.Pytester, no_sandboxes: list[VMConfig],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROVM_SANDBOX_MEM_MIB", "not a number")  # never read: nothing asks for a sandbox
    pytester.makepyfile("""
        import pytest

        def test_plain(): pass

        @pytest.mark.microvm
        def test_marked_but_local(): pass
    """)
    pytester.runpytest_inprocess("--strict-markers", "--microvm-local").assert_outcomes(passed=2)
    assert not no_sandboxes
    markers = pytester.runpytest_inprocess("--markers").stdout.str()
    assert "@pytest.mark.microvm(mem_mib=None, vcpus=None, timeout=None): run this test in a fresh micro-VM" in markers


def test_a_marked_test_that_cannot_run_there_fails_with_why(pytester: pytest.Pytester,
                                                            no_sandboxes: list[VMConfig]) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.microvm
        def test_wants_a_sandbox(sandbox): pass

        @pytest.mark.microvm(vcpus=1000)
        def test_too_many_vcpus(): pass
    """)
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*_ ERROR at setup of test_wants_a_sandbox _*",
        "microvm: a test marked microvm runs in a VM already: the sandbox fixture is not available there "
        "(a guest has no /dev/kvm)",
        "*_ ERROR at setup of test_too_many_vcpus _*",
        "microvm: vcpus must be between 1 and 254, got 1000",
    ])
    assert not no_sandboxes


@pytest.fixture
def local_agents(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[LocalAgent]]:
    """Marked tests run through agents on this host (each its own), files under tmp_path."""
    agents: list[LocalAgent] = []

    def start(self: plugin.State, vm: VMConfig) -> LocalAgent:
        # No entry-point plugins in the "guest": as in a VM whose venv has only pytest.
        agents.append(LocalAgent(timeout=vm.timeout, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}))
        return agents[-1]

    monkeypatch.setattr(plugin.State, "start_sandbox", start)
    monkeypatch.setattr(plugin.State, "guest_dir", str(tmp_path / "guest"))
    yield agents
    for agent in agents:
        agent.close()


def test_marked_tests_read_as_if_run_here(pytester: pytest.Pytester, local_agents: list[LocalAgent]) -> None:
    pytest_runs.copy_sample(pytester.path)
    here = pytester.runpytest_inprocess("-p", "no:microvm", "-rA", "--junitxml=here.xml", "sample_outcomes.py")
    there = pytester.runpytest_inprocess("-rA", "--junitxml=there.xml", "sample_outcomes.py")
    for run in (here, there):
        run.stdout.fnmatch_lines([f"*= {pytest_runs.SUMMARY} in *"])
    assert pytest_runs.sections(there.outlines) == pytest_runs.sections(here.outlines)
    assert set(pytest_runs.sections(here.outlines)) == set(pytest_runs.COMPARED_SECTIONS)

    cases = pytest_runs.junit_cases(pytester.path / "there.xml")
    assert {name: outcome for name, (outcome, _) in cases.items()} == pytest_runs.OUTCOMES
    assert len(local_agents) == 4  # a "VM" each
    assert sorted(props["microvm_boot_id"] for _, props in cases.values()) == sorted(a.boot_id for a in local_agents)


def test_a_guest_that_ends_or_overstays_fails_the_test(pytester: pytest.Pytester,
                                                       local_agents: list[LocalAgent]) -> None:
    pytest_runs.copy_sample(pytester.path)
    result = pytester.runpytest_inprocess("sample_ends.py")
    # Which phase the end lands in (setup: an error; call: a failure) depends on
    # how far the guest's pytest got, which is timing: the count and the words are not.
    # Nor is the order of the two reports: pytest prints its ERRORS (setup) section
    # before its FAILURES, so each test's lines are looked for on their own.
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 2 and not outcomes.get("passed")
    result.stdout.fnmatch_lines(["*test_kills_its_guest*",
                                 "AgentError: the guest agent's connection ended during the request"])
    result.stdout.fnmatch_lines(["*test_overstays*", "the test did not finish within 2.0 s in its VM (killed there)"])


def test_the_sandbox_fixture(pytester: pytest.Pytester, local_agents: list[LocalAgent],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[VMConfig] = []
    start = plugin.State.start_sandbox
    monkeypatch.setattr(plugin.State, "start_sandbox", lambda self, vm: asked.append(vm) or start(self, vm))
    pytester.makeini("[pytest]\nmicrovm_vcpus = 2\n")
    pytester.makepyfile("""
        import pytest

        def test_default(sandbox):
            assert sandbox.exec(["echo", "hi"]).stdout == b"hi\\n"

        @pytest.mark.sandbox(mem_mib=512, timeout=30)
        def test_sized(sandbox):
            pass
    """)
    pytester.runpytest_inprocess().assert_outcomes(passed=2)
    assert asked == [VMConfig(mem_mib=DEFAULT_MEM_MIB, vcpus=2, timeout=None), VMConfig(512, 2, 30.0)]
    assert all(agent.client is None or agent.client.error is not None for agent in local_agents)  # closed


def test_the_sandbox_fixture_says_why_it_cannot_start(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_it(sandbox): pass\n")
    result = pytester.runpytest_inprocess("--microvm-image", "missing.json")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["microvm: cannot start the sandbox: ImageError: cannot read the python image "
                                 f"manifest {pytester.path}/missing.json: *"])


def test_loading_the_plugin_is_cheap() -> None:
    code = ("import sys, microvm.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.startswith(('microvm.sandbox', 'microvm.machine', "
            "'microvm.pyimage', 'microvm._kvm', 'microvm.agent', 'tarfile', 'msgpack'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout == "[]\n"


def test_local_tests_around_a_marked_one_keep_their_fixtures(pytester: pytest.Pytester,
                                                             local_agents: list[LocalAgent]) -> None:
    # A marked test skips the local runner's setup and teardown; the fixtures local tests set
    # up must still be torn down where the runner would have (here: when module one is done).
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_one="""
        import pytest

        EVENTS = []

        @pytest.fixture(scope="module")
        def shared():
            EVENTS.append("up")
            yield
            EVENTS.append("down")

        def test_local_a(shared): assert EVENTS == ["up"]

        @pytest.mark.microvm
        def test_marked_b(): pass

        def test_local_c(shared): assert EVENTS == ["up"]

        @pytest.mark.microvm
        def test_marked_d(): pass
    """, test_two="""
        import test_one

        def test_after(): assert test_one.EVENTS == ["up", "down"]
    """)
    pytester.runpytest_inprocess("-p", "no:randomly").assert_outcomes(passed=5)
    assert len(local_agents) == 2
