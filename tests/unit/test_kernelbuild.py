"""Unit tests for the guest kernel build: keys, config checks, requirements. No build runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from microvm import kernelbuild
from microvm.kernelbuild import KernelArtifacts, KernelBuildError

FRAGMENT = """\
CONFIG_64BIT=y
CONFIG_NR_CPUS=32
CONFIG_VIRTIO_MMIO=y
# CONFIG_STRICT_DEVMEM is not set
"""


def test_key_is_stable_and_short() -> None:
    a = kernelbuild.build_key(FRAGMENT, "6.1.176-1", compiler="gcc 12.2.0")
    assert a == kernelbuild.build_key(FRAGMENT, "6.1.176-1", compiler="gcc 12.2.0")
    assert len(a) == 16
    int(a, 16)


@pytest.mark.parametrize("change", [
    {"fragment_text": FRAGMENT + "CONFIG_PVH=y\n"},
    {"source_version": "6.1.177-1"},
    {"compiler": "gcc 13.1.0"},
])
def test_key_changes_with_each_input(change: dict[str, str]) -> None:
    base = {"fragment_text": FRAGMENT, "source_version": "6.1.176-1", "compiler": "gcc 12.2.0"}
    assert kernelbuild.build_key(**base) != kernelbuild.build_key(**{**base, **change})


def test_key_changes_with_script_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = kernelbuild.build_key(FRAGMENT, "6.1.176-1", compiler="gcc")
    monkeypatch.setattr(kernelbuild, "BUILD_SCRIPT_VERSION", "999")
    assert kernelbuild.build_key(FRAGMENT, "6.1.176-1", compiler="gcc") != before


def test_parse_config_reads_set_and_unset() -> None:
    assert kernelbuild.parse_config(FRAGMENT + "# a comment\nCONFIG_CMDLINE=\"x y\"\n") == {
        "CONFIG_64BIT": "y", "CONFIG_NR_CPUS": "32", "CONFIG_VIRTIO_MMIO": "y",
        "CONFIG_STRICT_DEVMEM": "n", "CONFIG_CMDLINE": '"x y"',
    }


def test_verify_accepts_a_config_that_kept_everything() -> None:
    final = "CONFIG_64BIT=y\nCONFIG_NR_CPUS=32\nCONFIG_VIRTIO_MMIO=y\nCONFIG_X86=y\n"
    # STRICT_DEVMEM is absent from the final config: absent counts as "not set".
    kernelbuild.verify_config(FRAGMENT, final)


def test_verify_names_dropped_and_changed_options() -> None:
    final = ("CONFIG_64BIT=y\nCONFIG_NR_CPUS=64\n# CONFIG_VIRTIO_MMIO is not set\n"
             "CONFIG_STRICT_DEVMEM=y\n")
    with pytest.raises(KernelBuildError) as info:
        kernelbuild.verify_config(FRAGMENT, final)
    msg = str(info.value)
    assert "CONFIG_VIRTIO_MMIO (wanted y, got n)" in msg
    assert "CONFIG_NR_CPUS (wanted 32, got 64)" in msg
    assert "CONFIG_STRICT_DEVMEM (wanted n, got y)" in msg
    assert "CONFIG_64BIT" not in msg


def test_verify_treats_a_missing_symbol_as_dropped() -> None:
    with pytest.raises(KernelBuildError, match=r"CONFIG_VIRTIO_MMIO \(wanted y, got n\)"):
        kernelbuild.verify_config(FRAGMENT, "CONFIG_64BIT=y\nCONFIG_NR_CPUS=32\n")


def test_merge_fragment_replaces_base_lines() -> None:
    base = "CONFIG_64BIT=y\n# CONFIG_VIRTIO_MMIO is not set\nCONFIG_NR_CPUS=1\nCONFIG_X86=y\n"
    merged = kernelbuild.merge_fragment(base, FRAGMENT)
    assert merged.count("VIRTIO_MMIO") == 1
    assert merged.count("NR_CPUS") == 1
    assert kernelbuild.parse_config(merged) == {**kernelbuild.parse_config(FRAGMENT), "CONFIG_X86": "y"}


def test_repo_fragment_parses_and_asks_for_the_essentials() -> None:
    wanted = kernelbuild.parse_config(kernelbuild.FRAGMENT.read_text())
    for name in ("64BIT", "SMP", "X86_MPPARSE", "PVH", "KVM_GUEST", "SERIAL_8250_CONSOLE",
                 "VIRTIO_MMIO", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_BLK", "VIRTIO_NET",
                 "DEVMEM", "BLK_DEV_INITRD", "RD_GZIP"):
        assert wanted[f"CONFIG_{name}"] == "y", name
    for name in ("PCI", "ACPI", "MODULES", "STRICT_DEVMEM"):
        assert wanted[f"CONFIG_{name}"] == "n", name


@pytest.fixture
def all_present(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A host where the tarball, every tool and every header exist."""
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    tarball.write_bytes(b"x")
    include = tmp_path / "include"
    for header in kernelbuild.REQUIRED_HEADERS:
        (include / header).parent.mkdir(parents=True, exist_ok=True)
        (include / header).write_text("")
    monkeypatch.setattr(kernelbuild, "SOURCE_TARBALL", tarball)
    monkeypatch.setattr(kernelbuild, "INCLUDE_DIRS", (include,))
    monkeypatch.setattr(shutil, "which", lambda tool: f"/usr/bin/{tool}")
    return tmp_path


def test_no_missing_requirements(all_present: Path) -> None:
    assert kernelbuild.missing_packages() == []
    kernelbuild.check_requirements()


def test_missing_tools_name_the_packages(all_present: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool in ("bison", "xz") else f"/bin/{tool}")
    with pytest.raises(KernelBuildError) as info:
        kernelbuild.check_requirements()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.endswith("apt-get install bison xz-utils")


def test_missing_source_and_headers(all_present: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernelbuild, "SOURCE_TARBALL", all_present / "nope.tar.xz")
    monkeypatch.setattr(kernelbuild, "INCLUDE_DIRS", (all_present / "empty",))
    assert kernelbuild.missing_packages() == ["linux-source-6.1", "libelf-dev", "libssl-dev"]


def test_build_kernel_checks_requirements_first(all_present: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    monkeypatch.setenv("MICROVM_CACHE", str(all_present / "cache"))
    with pytest.raises(KernelBuildError, match="apt-get install make gcc"):
        kernelbuild.build_kernel(progress=False)
    assert not (all_present / "cache").exists()


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path))
    assert kernelbuild.cache_dir() == tmp_path
    monkeypatch.delenv("MICROVM_CACHE")
    assert kernelbuild.cache_dir() == Path.home() / ".cache" / "microvm"


def _fake_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Path]:
    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path))
    monkeypatch.setattr(kernelbuild, "source_version", lambda: "6.1.176-1")
    monkeypatch.setattr(kernelbuild, "compiler_version", lambda: "gcc 12.2.0")
    key = kernelbuild.build_key(kernelbuild.FRAGMENT.read_text(), "6.1.176-1")
    entry = tmp_path / "kernels" / key
    entry.mkdir(parents=True)
    return key, entry


def test_find_default_kernel_returns_complete_entry(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key, entry = _fake_cache(monkeypatch, tmp_path)
    for name in ("vmlinux", "bzImage", "config"):
        (entry / name).write_bytes(b"\x7fELF")
    assert kernelbuild.find_default_kernel() == KernelArtifacts(
        vmlinux=entry / "vmlinux", bzimage=entry / "bzImage", config=entry / "config", key=key)


def test_find_default_kernel_ignores_incomplete_entry(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, entry = _fake_cache(monkeypatch, tmp_path)
    (entry / "vmlinux").write_bytes(b"\x7fELF")
    (entry / "config").write_text("")
    assert kernelbuild.find_default_kernel() is None


def test_find_default_kernel_without_source_package(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_package() -> str:
        raise KernelBuildError("linux-source-6.1 is not installed")

    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path))
    monkeypatch.setattr(kernelbuild, "source_version", no_package)
    assert kernelbuild.find_default_kernel() is None


def test_failed_step_shows_log_tail_and_counts_objects(tmp_path: Path) -> None:
    log_path = tmp_path / "build.log"
    script = "for i in 1 2 3; do echo \"  CC      f$i.o\"; done; echo 'error: boom'; exit 3"
    with open(log_path, "w") as log:
        runner = kernelbuild._Runner(log, None)
        with pytest.raises(KernelBuildError) as info:
            runner.run(["sh", "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert runner.objects == 3
    assert "exit status 3" in str(info.value)
    assert str(info.value).endswith("error: boom")
    assert str(log_path) in str(info.value)
    assert "error: boom" in log_path.read_text()


def test_error_is_part_of_the_hierarchy() -> None:
    from microvm.errors import MicroVMError

    assert issubclass(KernelBuildError, MicroVMError)


def test_default_kernel_key_is_remembered_until_an_input_changes(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    fragment = tmp_path / "fragment.config"
    fragment.write_text("CONFIG_X=y\n")
    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernelbuild, "FRAGMENT", fragment)
    calls: list[str] = []

    def counting_key(text: str, version: str, **kw: str) -> str:
        calls.append(text)
        return "k" + str(len(calls))

    monkeypatch.setattr(kernelbuild, "build_key", counting_key)
    monkeypatch.setattr(kernelbuild, "source_version", lambda: "6.1.test")
    for _ in range(3):
        assert kernelbuild.find_default_kernel() is None  # nothing built under that key
    assert len(calls) == 1  # asked dpkg/gcc once, then remembered
    fragment.write_text("CONFIG_X=n\n")
    kernelbuild.find_default_kernel()
    assert len(calls) == 2
    done = kernelbuild.kernels_dir() / "k2"
    done.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "config"):
        (done / name).write_bytes(b"x")
    art = kernelbuild.find_default_kernel()
    assert art is not None and art.key == "k2" and len(calls) == 2
