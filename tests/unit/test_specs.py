"""Drive and Nic: the user's values, validated before any VM or tap exists; the CLI forms."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from microvm.cli import main
from microvm.errors import ConfigError
from microvm.specs import Drive, Nic


def test_nic_parse_full_form() -> None:
    n = Nic.parse("tap=mv0,mac=02:00:00:00:00:07,ip=10.0.0.2/24,host_ip=10.0.0.1/24,netns=ns1,bridge=br0")
    assert n == Nic(tap="mv0", mac="02:00:00:00:00:07", ip="10.0.0.2/24", host_ip="10.0.0.1/24", netns="ns1",
                    bridge="br0")
    assert n.kernel_ip_arg("eth0") == "ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"


def test_nic_without_host_address_has_no_gateway() -> None:
    assert Nic("mv0", ip="192.168.7.9/16").kernel_ip_arg("eth1") == "ip=192.168.7.9:::255.255.0.0::eth1:off"
    assert Nic("mv0").kernel_ip_arg("eth0") == ""


@pytest.mark.parametrize("spec", [
    "", "mv0", "tap=", "tap=mv0,ip", "tap=mv0,speed=10", "tap=mv0,tap=mv1", "mac=02:00:00:00:00:01",
    "tap=mv0,mac=01:00:00:00:00:01", "tap=mv0,mac=nonsense", "tap=mv0,ip=10.0.0.2",
    "tap=mv0,ip=10.0.0.300/24", "tap=mv0,ip=10.0.0.2/24,host_ip=10.1.0.1/24",
    "tap=mv0,ip=10.0.0.2/24,host_ip=10.0.0.2/24",
    "tap=mv0,ip=10.0.0.2/32", "tap=a/b", "tap=" + "x" * 16, "tap=mv0,bridge=bad/name",
])
def test_nic_bad_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        Nic.parse(spec)


@pytest.mark.parametrize("spec,want", [
    ("disk.img", Drive("disk.img")),
    ("disk.img,ro", Drive("disk.img", read_only=True)),
    ("disk.img,ro,direct", Drive("disk.img", read_only=True, direct=True)),
])
def test_drive_parse(spec: str, want: Drive) -> None:
    assert Drive.parse(spec) == want


@pytest.mark.parametrize("args,words", [
    (["--net", "tap=mv0,ip=10.0.0.2"], "needs a prefix length"),
    (["--net", "ip=10.0.0.2/24"], "tap=NAME is required"),
    (["--net", "tap=mv0", "--net", "tap=mv0"], "the same tap is given twice"),
    (["--drive", "x.img,fast"], "expected PATH"),
])
def test_cli_rejects_bad_devices_in_one_line(args: list[str], words: str) -> None:
    r = CliRunner().invoke(main, ["run", "--force", *args, "--", "true"])
    assert r.exit_code != 0
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0], r.output


def test_switch_interval_is_shortened_only_from_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from microvm import hostprocess

    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv("MICROVM_SWITCH_INTERVAL", raising=False)
        sys.setswitchinterval(hostprocess.PYTHON_DEFAULT_SWITCH_INTERVAL)
        hostprocess.tune_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(hostprocess.VMM_SWITCH_INTERVAL)
        sys.setswitchinterval(0.002)  # the program's own choice stays
        hostprocess.tune_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(0.002)
        sys.setswitchinterval(hostprocess.PYTHON_DEFAULT_SWITCH_INTERVAL)
        monkeypatch.setenv("MICROVM_SWITCH_INTERVAL", "keep")
        hostprocess.tune_switch_interval()
        assert sys.getswitchinterval() == pytest.approx(hostprocess.PYTHON_DEFAULT_SWITCH_INTERVAL)
        monkeypatch.setenv("MICROVM_SWITCH_INTERVAL", "fast")
        with pytest.raises(ConfigError, match="MICROVM_SWITCH_INTERVAL"):
            hostprocess.tune_switch_interval()
    finally:
        sys.setswitchinterval(before)
