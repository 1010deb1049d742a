"""TAP interfaces: the host end of a guest's virtio-net device.

A tap opened with IFF_VNET_HDR carries, in front of every frame, the same
header virtio-net uses (struct virtio_net_hdr_v1, 12 bytes once
TUNSETVNETHDRSZ says so), so checksum and segmentation offloads pass between
the guest and the host kernel untouched: a 64 KiB TCP segment crosses as one
frame, and the host kernel splits it only if it has to.

Host-side configuration (link up, address, bridge, namespace) goes through
pyroute2's netlink API. A tap we create is not persistent: the kernel
deletes it when its last fd closes, so nothing stays behind even if the VMM
dies. A tap that already existed (persistent, made by `ip tuntap add`) is
attached to and left as it was.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from microvm.checks import check_ifname
from microvm.errors import ConfigError, DeviceError

TUN_PATH = "/dev/net/tun"

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETIFF = 0x800454D2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

# The header in front of every frame, told to the tap with TUNSETVNETHDRSZ: struct virtio_net_hdr_v1
# (virtio 1.2, 5.1.6: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers).
# Defined here, not in devices/virtio/net.py, which uses it: devices import backends, never the reverse.
VNET_HDR_SIZE = 12


@dataclass(frozen=True)
class HostConfig:
    """How to set up the host end of a tap (only for taps we create)."""

    address: ipaddress.IPv4Interface | None = None  # the host's address on the link
    bridge: str | None = None  # enslave the tap to this existing bridge
    netns: str | None = None  # move the tap into this named network namespace (ip netns)


class Tap:
    """One TAP interface opened with a virtio-net header; owns its fd."""

    def __init__(self, name: str, host: HostConfig | None = None):
        self.name = check_ifname(name)
        self.host = host or HostConfig()
        self.created = False
        self.fd = -1
        existed = _link_exists(self.name)
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise DeviceError(f"{TUN_PATH} is missing: load the tun module (modprobe tun)") from e
        except PermissionError as e:
            raise DeviceError(f"no permission to open {TUN_PATH} (needs CAP_NET_ADMIN)") from e
        try:
            ifr = struct.pack("16sH22x", self.name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            except OSError as e:
                raise DeviceError(f"cannot attach tap {self.name}: {e.strerror}"
                                  f"{' (is it a tun device, or in use by another process?)' if existed else ''}"
                                  ) from e
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            self.created = not existed
            if self.created:
                self._configure_host()
            elif self.host != HostConfig():
                raise ConfigError(f"tap {self.name} already exists: microvm configures only taps it creates "
                                  f"(drop host_ip/bridge/netns, or let microvm create the tap)")
        except BaseException:
            self.close()
            raise

    def set_offload(self, flags: int) -> None:
        """Which offloads the reader (our guest) accepts: TUN_F_* bits."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def _configure_host(self) -> None:
        from pyroute2 import IPRoute, NetNS

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            if self.host.bridge is not None:
                bridges = ipr.link_lookup(ifname=self.host.bridge)
                if not bridges:
                    raise ConfigError(f"bridge {self.host.bridge} does not exist")
                ipr.link("set", index=index, master=bridges[0])
            if self.host.netns is not None:
                _check_netns(self.host.netns)
                ipr.link("set", index=index, net_ns_fd=self.host.netns)
        if self.host.netns is not None:
            with NetNS(self.host.netns) as ns:
                self._address_and_up(ns, ns.link_lookup(ifname=self.name)[0])
        else:
            with IPRoute() as ipr:
                self._address_and_up(ipr, index)

    def _address_and_up(self, ipr: object, index: int) -> None:
        if self.host.address is not None:
            addr = self.host.address
            ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)  # type: ignore[attr-defined]
        ipr.link("set", index=index, state="up")  # type: ignore[attr-defined]

    def close(self) -> None:
        """Close our fd; a tap we created disappears with it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_netns(name: str) -> None:
    if "/" in name or not os.path.exists(f"/var/run/netns/{name}"):
        raise ConfigError(f"network namespace {name!r} does not exist (ip netns add {name})")


def _link_exists(name: str) -> bool:
    """In this thread's network namespace (unlike /sys/class/net, which shows sysfs's)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
