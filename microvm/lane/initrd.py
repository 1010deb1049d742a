"""The lane's initramfs: busybox, the kernel modules it needs, and its /init,
which mounts the host over virtio-9p and runs the command (see run.py).
Built once per content hash."""

from __future__ import annotations

import hashlib
import lzma
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from microvm import initramfs
from microvm.errors import LaneError
from microvm.lane.kernel import LaneKernel

# Load order matters: insmod does not resolve dependencies. kvm-amd needs ccp
# (SEV), 9p needs netfs + fscache; tun/bridge/veth/overlay serve network tests
# and the writable root. module_order() also pulls in anything modinfo lists.
MODULES = (
    "irqbypass", "ccp", "kvm", "kvm-amd",
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "netfs", "fscache", "9pnet", "9pnet_virtio", "9p",
    "overlay", "tun", "llc", "stp", "bridge", "veth",
)

# The largest message 6.1's 9pnet_virtio accepts (PAGE_SIZE * (VIRTQUEUE_NUM - 3));
# bigger messages mean fewer round trips through TCG.
MSIZE = 512000
NINEP_OPTS = f"trans=virtio,version=9p2000.L,msize={MSIZE}"

START_MARK = "==microvm-lane:start=="
END_MARK = "==microvm-lane:end=="

# PID 1 of the lane (busybox sh). Fixed text: everything per-run comes from /ctl.
INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
grep -q lane.debug /proc/cmdline && set -x
# Nothing has written the status file if we stop here, so the host reports the
# console tail (which holds this message).
fail() { echo "lane-init: $*"; poweroff -f; }
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "lane-init: insmod $m failed"
done
mkdir -p /host /ctl /rw /newroot
mount -t 9p -o @NINEP@,ro,cache=loose host /host || fail "cannot mount the host root"
mount -t 9p -o @NINEP@ ctl /ctl || fail "cannot mount the ctl share"
. /ctl/config
mount -t tmpfs -o mode=0755 rw /rw
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# cgroup v2 with every controller ours to delegate: a jail's limits (microvm/jail) work in the lane.
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || echo "lane: no cgroup2" >&2
# /tmp stays the overlay's: a checkout under the host's /tmp must be visible.
mkdir -p "/newroot$LANE_OUT_PATH"
mount -t 9p -o @NINEP@ out "/newroot$LANE_OUT_PATH" || fail "cannot mount the out share"
ifconfig lo 127.0.0.1 up
echo "@START@"
env -i chroot /newroot /bin/sh -c "$(cat /ctl/run.sh)" </dev/null
status=$?
printf '\n%s\n' "@END@"
echo "$status" >/ctl/status
umount /ctl
reboot -f
"""


# --- modules and initramfs -------------------------------------------------------

def _modname(ko: Path) -> str:
    """Module name from a file name: kvm-amd.ko.xz -> kvm_amd (as modinfo depends= spells it)."""
    return ko.name.split(".ko")[0].replace("-", "_")


def read_module(ko: Path) -> bytes:
    """A module's ELF bytes; Debian 12 ships plain .ko, other kernels .ko.xz."""
    data = ko.read_bytes()
    if ko.name.endswith(".xz"):
        data = lzma.decompress(data)
    if data[:4] != b"\x7fELF":
        raise LaneError(f"{ko} is not an ELF module (only .ko and .ko.xz are supported)")
    return data


def modinfo(ko: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo ELF section (no kmod needed)."""
    data = read_module(ko)
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size in sections:
        if data[strtab + sh_name: data.index(b"\0", strtab + sh_name)] == b".modinfo":
            items = (s.decode(errors="replace") for s in data[offset:offset + size].split(b"\0") if s)
            return dict(item.partition("=")[::2] for item in items)
    return {}


def module_order(modules_dir: Path, wanted: Sequence[str] = MODULES) -> list[Path]:
    """The .ko files for `wanted` plus their dependencies, each after what it depends on."""
    index = {_modname(p): p for p in modules_dir.rglob("*.ko*")}
    builtin_file = modules_dir / "modules.builtin"
    builtin = {_modname(Path(line)) for line in builtin_file.read_text().split()} \
        if builtin_file.exists() else set()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise LaneError(f"module {name} not found under {modules_dir}")
        for dep in filter(None, modinfo(index[name]).get("depends", "").split(",")):
            visit(dep)
        order.append(index[name])

    for name in wanted:
        visit(name)
    return order


def build_initramfs(kernel: LaneKernel) -> initramfs.Cpio:
    cpio = initramfs.Cpio()
    for d in ("dev", "proc", "sys", "tmp"):
        cpio.add_dir(d)
    cpio.add_char_device("/dev/console", 5, 1)  # the kernel opens it before devtmpfs exists
    initramfs.add_busybox(cpio)
    names = []
    for ko in module_order(kernel.modules_dir):
        # Stored plain: busybox insmod would need its own decompressor otherwise.
        name = _modname(ko)
        cpio.add_file(f"/lib/modules/{name}.ko", read_module(ko))
        names.append(name)
    init = (INIT_SCRIPT.replace("@MODULES@", " ".join(names)).replace("@NINEP@", NINEP_OPTS)
            .replace("@START@", START_MARK).replace("@END@", END_MARK))
    cpio.add_file("/init", init.encode(), 0o755)
    return cpio


def initrd_path(kernel: LaneKernel) -> Path:
    """The lane initramfs, written once per distinct content (name = its hash)."""
    blob = build_initramfs(kernel).to_bytes()  # uncompressed: TCG decompresses slowly
    dest = kernel.root / f"initrd-{hashlib.sha256(blob).hexdigest()[:16]}.cpio"
    if not dest.exists():
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, dest)
    return dest
