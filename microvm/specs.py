"""What a user asks for, as plain values: disks (Drive) and network cards (Nic).

Each validates itself when made and has a parse() for its CLI form, so a bad
value is a ConfigError naming the option before any VM or tap exists.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvm.checks import check_ifname, parse_mac
from microvm.errors import ConfigError
from microvm.ratelimit import RateLimit, as_rate_limit, rate_limit_of


@dataclass(frozen=True)
class Drive:
    """A disk for the guest: a raw image file, /dev/vda, /dev/vdb, ... in order."""

    path: str | Path
    read_only: bool = False
    direct: bool = False  # O_DIRECT: bypass the host page cache
    rate_limit: RateLimit | None = None  # bytes and requests (ratelimit.py); MicroVM.set_rate_limit("vda", ...)
    # Log every write and flush to this file (backends/recording.py), for crash-consistency replays.
    record: str | Path | None = None

    def __post_init__(self) -> None:
        as_rate_limit("rate_limit", self.rate_limit)
        if self.record is not None:
            if not isinstance(self.record, str | os.PathLike) or not os.fspath(self.record):
                raise ConfigError(f"drive {self.path}: record must be a log file's path, got {self.record!r}")
            if self.read_only:
                raise ConfigError(f"drive {self.path}: record= logs writes, and a read-only drive has none")
            if os.path.abspath(self.record) == os.path.abspath(self.path):
                raise ConfigError(f"drive {self.path}: record= names the image itself")

    @classmethod
    def parse(cls, spec: str) -> Drive:
        """The CLI form: PATH[,ro][,direct][,bps=N][,iops=N][,record=LOG] (N: a number, K/M/G: 1024s)."""
        path, *opts = spec.split(",")
        keyed = dict(o.partition("=")[::2] for o in opts if o.partition("=")[0] in ("bps", "iops", "record"))
        unknown = [o for o in opts if o not in ("ro", "rw", "direct") and o.partition("=")[0] not in keyed]
        if not path or unknown or keyed.get("record") == "":
            raise ConfigError(f"--drive {spec!r}: expected PATH[,ro][,direct][,bps=N][,iops=N][,record=LOG]")
        return cls(path, read_only="ro" in opts, direct="direct" in opts,
                   rate_limit=rate_limit_of(f"--drive {spec!r}", keyed.get("bps"), keyed.get("iops")),
                   record=keyed.get("record"))


@dataclass(frozen=True)
class Nic:
    """A network card for the guest (virtio-net) on a host TAP interface: eth0, eth1, ... in order.

    tap: the tap's name; created (and removed at teardown) unless it exists.
    mac: the guest's MAC (default: a random locally administered one).
    ip: the guest's address with its prefix, e.g. "172.16.0.2/24".
    host_ip: the host end's address on a tap we create, e.g. "172.16.0.1/24";
        the guest's default gateway.
    netns: move the tap we create into this named network namespace.
    bridge: enslave the tap we create to this existing bridge.
    rx_rate_limit, tx_rate_limit: bytes and frames to and from the guest
        (ratelimit.py); MicroVM.set_rate_limit("eth0:rx", ...) changes them.
    """

    tap: str
    mac: str | None = None
    ip: str | None = None
    host_ip: str | None = None
    netns: str | None = None
    bridge: str | None = None
    rx_rate_limit: RateLimit | None = None
    tx_rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        check_ifname(self.tap)
        as_rate_limit("rx_rate_limit", self.rx_rate_limit)
        as_rate_limit("tx_rate_limit", self.tx_rate_limit)
        if self.mac is not None:
            parse_mac(self.mac)
        guest, host = self.guest_interface, self.host_interface
        if guest is not None and host is not None and guest.network != host.network:
            raise ConfigError(f"ip {guest} and host_ip {host} are not on the same network")
        if guest is not None and host is not None and guest.ip == host.ip:
            raise ConfigError(f"ip and host_ip are both {guest.ip}")
        if self.bridge is not None:
            check_ifname(self.bridge)

    @property
    def guest_interface(self) -> ipaddress.IPv4Interface | None:
        return _interface("ip", self.ip)

    @property
    def host_interface(self) -> ipaddress.IPv4Interface | None:
        return _interface("host_ip", self.host_ip)

    def kernel_ip_arg(self, device: str) -> str:
        """The kernel's static configuration (Documentation/admin-guide/nfs/nfsroot.rst):
        ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>."""
        guest = self.guest_interface
        if guest is None:
            return ""
        gw = self.host_interface.ip if self.host_interface is not None else ""
        return f"ip={guest.ip}::{gw}:{guest.netmask}::{device}:off"

    @classmethod
    def parse(cls, spec: str) -> Nic:
        """The CLI form: tap=NAME[,mac=MAC][,ip=ADDR/PREFIX][,host_ip=ADDR/PREFIX][,netns=NS][,bridge=BR]
        [,rx_bps=N][,tx_bps=N] (bytes a second to and from the guest; K/M/G: 1024s)."""
        fields: dict[str, Any] = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in ("tap", "mac", "ip", "host_ip", "netns", "bridge", "rx_bps", "tx_bps") \
                    or key in fields:
                raise ConfigError(f"--net {spec!r}: expected tap=NAME[,mac=..][,ip=..][,host_ip=..]"
                                  f"[,netns=..][,bridge=..][,rx_bps=..][,tx_bps=..]")
            fields[key] = value
        if "tap" not in fields:
            raise ConfigError(f"--net {spec!r}: tap=NAME is required")
        for way in ("rx", "tx"):
            fields[f"{way}_rate_limit"] = rate_limit_of(f"--net {spec!r}", fields.pop(f"{way}_bps", None), None)
        return cls(**fields)


def _interface(what: str, value: str | None) -> ipaddress.IPv4Interface | None:
    if value is None:
        return None
    if "/" not in value:
        raise ConfigError(f"{what} {value!r} needs a prefix length, e.g. {value}/24")
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError as e:
        raise ConfigError(f"{what} {value!r} is not an IPv4 address with prefix: {e}") from e
    if iface.network.prefixlen > 30:
        raise ConfigError(f"{what} {value}: a /{iface.network.prefixlen} leaves no room for two hosts")
    return iface


def guest_ip_args(nics: list[Nic] | tuple[Nic, ...]) -> str:
    """Kernel command-line arguments for the guests' addresses: the kernel's
    ip= for the first addressed NIC, microvm.ip= for our init for the rest."""
    args: list[str] = []
    for i, n in enumerate(nics):
        if n.guest_interface is None:
            continue
        if not args:
            args.append(n.kernel_ip_arg(f"eth{i}"))
        else:
            args.append(f"microvm.ip=eth{i},{n.guest_interface}")
    return " ".join(args)


def as_drive(value: object, field: str = "drives") -> Drive:
    """A Drive, or a path taken as a writable Drive; else a ConfigError naming `field`."""
    if isinstance(value, Drive):
        return value
    if isinstance(value, str | os.PathLike):
        return Drive(Path(value))
    raise ConfigError(f"{field}: expected a Drive or a path, got {value!r}")


def disk_name(index: int) -> str:
    """The kernel's name for the index-th virtio disk: vda ... vdz, vdaa, ... (sd.c's scheme)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(ord("a") + rem) + name
    return "vd" + name
