"""The TAP backend against the real kernel (/dev/net/tun), each test in a
fresh network namespace of its own (unshare --net), so the host's interfaces
are never touched. Needs root (CAP_NET_ADMIN), no KVM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not os.path.exists(
    "/dev/net/tun"), reason="needs root, unshare(1) and /dev/net/tun")

PRELUDE = """
import json, socket, subprocess
from pyroute2 import IPRoute
from microvm.backends.tap import Tap, HostConfig
from microvm.errors import MicroVMError
import ipaddress

def link(name):
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        l = ipr.get_links(found[0])[0]
        addrs = [a.get_attr("IFA_ADDRESS") + "/" + str(a["prefixlen"]) for a in ipr.get_addr(index=found[0])]
        return {"up": bool(l["flags"] & 1), "addrs": addrs, "kind": l.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"),
                "master": l.get_attr("IFLA_MASTER")}
out = {}
"""


def in_netns(code: str) -> dict:
    script = PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_created_tap_is_up_addressed_and_removed_on_close() -> None:
    out = in_netns("""
        tap = Tap("mvt0", HostConfig(address=ipaddress.IPv4Interface("10.9.0.1/24")))
        out["created"] = tap.created
        out["during"] = link("mvt0")
        tap.close()
        out["after"] = link("mvt0")
    """)
    assert out["created"] is True
    assert out["during"]["up"] and "10.9.0.1/24" in out["during"]["addrs"] and out["during"]["kind"] == "tun"
    assert out["after"] is None


def test_tap_goes_when_the_process_dies() -> None:
    out = in_netns("""
        import os
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            Tap("mvt1")
            os.write(w, b"x")
            os._exit(9)  # no close(), no cleanup: a crashed VMM
        os.read(r, 1)
        os.waitpid(pid, 0)
        out["after"] = link("mvt1")
    """)
    assert out["after"] is None


def test_existing_persistent_tap_is_attached_and_left() -> None:
    out = in_netns("""
        subprocess.run(["ip", "tuntap", "add", "mvt2", "mode", "tap", "vnet_hdr"], check=True)
        tap = Tap("mvt2")
        out["created"] = tap.created
        tap.close()
        out["after"] = link("mvt2") is not None
        try:
            Tap("mvt2", HostConfig(address=ipaddress.IPv4Interface("10.9.0.1/24")))
        except MicroVMError as e:
            out["error"] = str(e)
    """)
    assert out["created"] is False and out["after"] is True
    assert "already exists" in out["error"]


def test_tap_on_a_bridge() -> None:
    out = in_netns("""
        with IPRoute() as ipr:
            ipr.link("add", ifname="mvbr0", kind="bridge")
            br = ipr.link_lookup(ifname="mvbr0")[0]
        tap = Tap("mvt3", HostConfig(bridge="mvbr0"))
        out["master"] = link("mvt3")["master"] == br
        try:
            Tap("mvt4", HostConfig(bridge="nosuchbr"))
        except MicroVMError as e:
            out["error"] = str(e)
        out["leftover"] = link("mvt4")
    """)
    assert out["master"] is True
    assert "nosuchbr" in out["error"] and out["leftover"] is None


def test_tap_moved_into_a_named_netns() -> None:
    out = in_netns("""
        import os
        name = f"mvtest{os.getpid()}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            tap = Tap("mvt5", HostConfig(address=ipaddress.IPv4Interface("10.9.1.1/24"), netns=name))
            out["here"] = link("mvt5")
            r = subprocess.run(["ip", "-n", name, "-o", "addr", "show", "dev", "mvt5"], capture_output=True,
                               text=True)
            out["there"] = r.stdout
            tap.close()
            try:
                Tap("mvt6", HostConfig(netns="no-such-ns"))
            except MicroVMError as e:
                out["error"] = str(e)
        finally:
            subprocess.run(["ip", "netns", "del", name])
    """)
    assert out["here"] is None
    assert "10.9.1.1/24" in out["there"]
    assert "no-such-ns" in out["error"]


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "..", "a:b"])
def test_bad_names(name: str) -> None:
    from microvm.checks import check_ifname
    from microvm.errors import ConfigError

    with pytest.raises(ConfigError):
        check_ifname(name)


def test_the_tap_is_told_the_header_virtio_net_uses() -> None:
    from microvm.backends import tap
    from microvm.devices.virtio import net_abi

    assert tap.VNET_HDR_SIZE == net_abi.VNET_HDR_SIZE == 12  # struct virtio_net_hdr_v1
