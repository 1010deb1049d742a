"""What MicroVM refuses before any VM exists: each bad value is a ConfigError naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from microvm.backends import Backends
from microvm.errors import ConfigError
from microvm.machine import MicroVM
from microvm.specs import Drive, Nic, disk_name


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"mem_mib": 128.5}, "mem_mib"),
    ({"mem_mib": "128"}, "mem_mib"),
    ({"mem_mib": True}, "mem_mib"),
    ({"mem_mib": 15}, "mem_mib"),
    ({"vcpus": 2.5}, "vcpus"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": "2"}, "vcpus"),
    ({"drives": "abc"}, "drives"),
    ({"drives": Path("abc")}, "drives"),
    ({"drives": [3]}, "drives"),
    ({"rootfs": 3}, "rootfs"),
    ({"env": {"A=B": "x"}}, "env name"),
    ({"env": {"1A": "x"}}, "env name"),
    ({"env": {"A": 1}}, "env"),
    ({"env": {"A": "x\0y"}}, "env"),
    ({"env": ["A"]}, "env"),
    ({"append": "-- foo"}, "append"),
    ({"append": "quiet -- foo"}, "append"),
    ({"append": 'x="abc'}, "append"),
    ({"append": "a\0b"}, "append"),
    ({"append": 3}, "append"),
    ({"cmdline": 'console=ttyS0 "'}, "cmdline"),
    ({"kernel": 3}, "kernel"),
    ({"initrd": 3}, "initrd"),
    ({"nics": "tap0"}, "nics"),
    ({"full_log": True, "append": "console=hvc1"}, "full_log"),
])
def test_bad_values_name_their_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        MicroVM(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", ["echo hi", b"echo", ["echo", "a\0b"], ["echo", 3], [], None, 3])
def test_bad_commands_are_refused_before_booting(argv: object) -> None:
    with pytest.raises(ConfigError, match="command"):
        MicroVM().run(argv)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [float("inf"), float("-inf"), float("nan"), 0, -1, "10", False])
def test_bad_timeouts_are_refused_before_booting(timeout: object) -> None:
    with pytest.raises(ConfigError, match="timeout"):
        MicroVM().run(["true"], timeout=timeout)  # type: ignore[arg-type]


def test_good_values_pass() -> None:
    vm = MicroVM(mem_mib=64, vcpus=2, env={"A_1": "x y", "_B": ""}, drives=[Drive("d.img"), "e.img"],
                 append='quiet x="a b"')
    assert [str(d.path) for d in vm.drives] == ["d.img", "e.img"]
    assert vm.env == {"A_1": "x y", "_B": ""}


def test_the_same_image_twice_read_write_says_so(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    backends = Backends([Drive(img), Drive(tmp_path / "." / "d.img", read_only=True)], [])
    with pytest.raises(ConfigError, match=r"given twice \(drives 0 and 1\)"):
        backends.open()
    assert backends.disks == []  # nothing left open


def test_the_same_image_twice_read_only_is_fine(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    backends = Backends([Drive(img, read_only=True), Drive(img, read_only=True)], [])
    backends.open()
    try:
        assert len(backends.disks) == 2
    finally:
        backends.close()


def test_more_devices_than_interrupt_lines_are_refused_naming_the_limit() -> None:
    MicroVM(drives=[f"d{i}.img" for i in range(17)])  # 17 fit, with the console's and rng's lines
    with pytest.raises(ConfigError, match="17 drives and 1 NICs are too many: a VM takes at most 17"):
        MicroVM(drives=[f"d{i}.img" for i in range(17)], nics=[Nic("mvmtest0")])
    with pytest.raises(ConfigError, match="16 drives and 1 NICs and vsock are too many"):
        MicroVM(drives=[f"d{i}.img" for i in range(16)], nics=[Nic("mvmtest0")], vsock="/tmp/v.sock")


def test_disks_are_named_as_the_kernel_names_them() -> None:
    assert [disk_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == \
        ["vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]
