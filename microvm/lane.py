"""The hardware-virtualization lane: run a host command where /dev/kvm is real KVM.

On hosts whose /dev/kvm cannot run Linux guests (PVM, see
/work/shared/ENVIRONMENT.md) we boot Debian's stock 6.1 kernel in QEMU with TCG
and an emulated AMD-V CPU (`-cpu max,+svm`). A small busybox initramfs loads
kvm-amd and 9p, mounts the host's / read-only over virtio-9p, layers a tmpfs
over it with overlayfs so the command may write anywhere, chroots into it and
runs the command. Inside, /dev/kvm is nested KVM with hardware semantics.

Host <-> guest plumbing, all over virtio-9p:
  host  the host's / (read-only), the overlay's lower layer
  ctl   a private temp dir: config + run.sh in, status out
  out   the caller's output dir, mounted at the same path (or one chosen)

The per-run data lives in ctl, so the initramfs depends only on the kernel and
busybox and is built once per content hash.

Usage: python -m microvm.lane [--cwd D] [--timeout S] [--env K=V] -- CMD ...
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import lzma
import os
import re
import select
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm import initramfs
from microvm.errors import MicroVMError


class LaneError(MicroVMError):
    """The lane could not run the command (not: the command failed)."""


class LaneTimeout(LaneError):
    """The command did not finish in time; QEMU was killed."""


QEMU = "qemu-system-x86_64"
KERNEL_META = "linux-image-amd64"
KERNEL_RE = re.compile(r"linux-image-(6\.1\.0-(\d+)-amd64)(?:-unsigned)?$")

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
TAIL_LINES = 60  # console lines quoted in a LaneError

# Host variables worth carrying into the chroot so tools behave the same there.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYENV_ROOT", "PYENV_VERSION")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# One TCG thread: multi-threaded TCG with nested SVM was seen to hang now and
# then; a 1-vCPU lane still runs 2-vCPU guests (their threads time-share).
DEFAULT_SMP = int(os.environ.get("MICROVM_LANE_SMP", "1"))

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


@dataclass(frozen=True)
class LaneResult:
    returncode: int
    output: str  # the command's console output, "\r\n" folded to "\n"
    wall_s: float


@dataclass(frozen=True)
class LaneKernel:
    release: str  # e.g. "6.1.0-50-amd64"
    root: Path  # the package extracted by dpkg-deb -x

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def cache_dir() -> Path:
    base = os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm"
    return Path(base) / "lane"


# --- kernel --------------------------------------------------------------------

def _run(argv: Sequence[str], cwd: str | None = None) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout
    except FileNotFoundError as e:
        raise LaneError(f"{argv[0]} not found") from e
    except subprocess.CalledProcessError as e:
        raise LaneError(f"{shlex.join(argv)} failed: {e.stderr.strip()}") from e


def _release_key(release: str) -> int:
    m = KERNEL_RE.match(f"linux-image-{release}")
    return int(m.group(2)) if m else -1


def _cached_kernel(root: Path) -> LaneKernel | None:
    """The newest kernel already extracted: reruns never consult apt."""
    found = [LaneKernel(d.name, d) for d in root.glob("6.1.0-*-amd64") if _release_key(d.name) >= 0]
    found = [k for k in found if k.vmlinuz.is_file()]
    return max(found, key=lambda k: _release_key(k.release), default=None)


def _wanted_packages() -> list[str]:
    """Package names to try, best first: what linux-image-amd64 depends on, else the newest ABI."""
    names = [n for n in re.findall(r"Depends: (\S+)", _run(["apt-cache", "depends", KERNEL_META]))
             if KERNEL_RE.match(n)]
    if not names:
        found = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
        names = sorted((line.split()[0] for line in found.splitlines()),
                       key=lambda n: _release_key(KERNEL_RE.match(n).group(1)),  # type: ignore[union-attr]
                       reverse=True)[:1]
    if not names:
        raise LaneError("no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)")
    # The signed and unsigned images carry the same modules; either boots under QEMU.
    return [n for name in names for n in (name, name + "-unsigned")]


def find_kernel() -> LaneKernel:
    """Debian's 6.1 kernel, downloaded and extracted into the cache (never into /boot)."""
    root = cache_dir()
    cached = _cached_kernel(root)
    if cached:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for pkg in _wanted_packages():
        release = KERNEL_RE.match(pkg).group(1)  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            try:
                # The sandbox user _apt cannot write into root's cache dir.
                _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", pkg], cwd=tmp)
                deb = next(Path(tmp).glob("*.deb"))
                _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
            except LaneError as e:
                errors.append(str(e))
                continue
            try:  # atomic publish; a concurrent run may have won the race
                os.rename(Path(tmp) / "x", root / release)
            except OSError:
                if not (root / release).is_dir():
                    raise
        kernel = LaneKernel(release, root / release)
        if kernel.vmlinuz.is_file():
            return kernel
    raise LaneError("cannot fetch the lane kernel:\n" + "\n".join(errors))


def extract_vmlinux(bzimage: Path, dest: Path) -> bool:
    """Unpack the ELF vmlinux inside an XZ bzImage; False if it is not one.

    Under TCG the bzImage's own XZ decompressor takes ~3 s, which is most of
    the lane's boot. The vmlinux carries a PVH entry note (CONFIG_PVH=y), so
    QEMU's -kernel loads it directly. Layout: Documentation/x86/boot.rst
    (setup_sects at 0x1f1, payload_offset/payload_length at 0x248).
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        return False
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    if not payload.startswith(b"\xfd7zXZ\0"):
        return False
    # The build appends the decompressed size after the stream; the
    # decompressor stops at the end of the stream and leaves it unused.
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        return False
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, dest)
    return True


def boot_image(kernel: LaneKernel) -> Path:
    """The file to give QEMU's -kernel: the cached vmlinux when possible."""
    vmlinux = kernel.root / "boot" / f"vmlinux-{kernel.release}"
    if vmlinux.is_file() or extract_vmlinux(kernel.vmlinuz, vmlinux):
        return vmlinux
    return kernel.vmlinuz


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


# --- one run -----------------------------------------------------------------------

def run_script(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
    """The shell text the chroot's /bin/sh runs: cd, export, exec argv."""
    if not argv:
        raise ValueError("empty command")
    lines = [f"cd -- {shlex.quote(cwd)} || exit 127"]
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"environment variable name {key!r} cannot be passed to a shell")
        lines.append(f"export {shlex.quote(f'{key}={value}')}")
    lines.append("exec " + shlex.join(argv))
    return "\n".join(lines) + "\n"


def lane_env(extra: Mapping[str, str] | None, out_path: str, tty: bool = False) -> dict[str, str]:
    """The command's environment: a few host variables, the lane's, then the caller's."""
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root")
    # The command writes to the serial console, a tty; unless our own output is
    # a terminal, TERM=dumb keeps colour codes (pytest, ls, ...) out of logs.
    env["TERM"] = os.environ.get("TERM", "dumb") if tty else "dumb"
    env.update(MICROVM_LANE="1", MICROVM_LANE_OUT=out_path)
    env.update(extra or {})
    return env


def _virtfs(path: Path | str, tag: str, readonly: bool = False) -> list[str]:
    # multidevs=remap keeps inode numbers unique when the share spans filesystems.
    escaped = str(path).replace(",", ",,")  # QEMU's option syntax doubles commas
    opts = f"local,path={escaped},mount_tag={tag},security_model=none,multidevs=remap"
    return ["-virtfs", opts + (",readonly=on" if readonly else "")]


def qemu_command(kernel: Path, initrd: Path, ctl_dir: Path, out_dir: Path, *,
                 smp: int = DEFAULT_SMP, mem_mib: int = 2048, debug: bool = False) -> list[str]:
    accel = "tcg,thread=multi" if smp > 1 else "tcg"
    # quiet leaves errors and panics on the console: rare, and what a failure needs.
    append = "console=ttyS0 panic=-1 " + ("lane.debug loglevel=7" if debug else "quiet")
    return [
        QEMU, "-M", "q35", "-accel", accel, "-cpu", "max,+svm", "-smp", str(smp), "-m", str(mem_mib),
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        *_virtfs("/", "host", readonly=True), *_virtfs(ctl_dir, "ctl"), *_virtfs(out_dir, "out"),
    ]


def lane_available() -> str | None:
    """None if the lane can run here, else why not (without downloading anything)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    try:
        initramfs.busybox_path()
    except initramfs.CpioError as e:
        return str(e)
    if _cached_kernel(cache_dir()) is None:
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                return f"no cached lane kernel and {tool} is missing to fetch one"
    return None


class _Console:
    """Splits the serial stream into boot noise, the command's output and shutdown noise.

    Works line by line so a marker is never split across reads. The init prints
    a newline before END_MARK in case the output lacked one; one blank line
    just before the mark is that newline and is dropped.
    """

    def __init__(self, stream: bool, passthrough: bool = False) -> None:
        self.stream = stream
        self.passthrough = passthrough  # show boot and shutdown lines too (debug)
        self.state = "boot"  # -> "command" -> "done"
        self.output: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._blank = 0  # blank command lines held back, one may be the marker's
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self._buf += self._decoder.decode(chunk, final)
        lines = self._buf.split("\n")
        self._buf = lines.pop()
        if final and self._buf:
            lines.append(self._buf)
            self._buf = ""
        for line in lines:
            self._line(line.removesuffix("\r"))

    def _line(self, line: str) -> None:
        self._tail.append(line)
        if self.state == "command":
            if line == END_MARK:
                self.state = "done"
                self._emit("\n" * max(self._blank - 1, 0))
            elif not line:
                self._blank += 1
            else:
                self._emit("\n" * self._blank + line + "\n")
                self._blank = 0
        elif self.state == "boot" and line == START_MARK:
            self.state = "command"
        elif self.passthrough and self.stream:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def _emit(self, text: str) -> None:
        self.output.append(text)
        if self.stream and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def tail(self) -> str:
        return "\n".join(self._tail)


def run_in_lane(argv: Sequence[str], *, cwd: str | None = None, env: Mapping[str, str] | None = None,
                timeout: float = 1800, out_dir: Path | None = None, out_path: str | None = None,
                smp: int | None = None, mem_mib: int = 2048, stream: bool = True,
                debug: bool = False) -> LaneResult:
    """Run argv inside the lane; return its exit status and console output.

    out_dir (default: a fresh temp dir) is shared read-write and mounted at
    out_path inside (default: the same absolute path); the command finds it in
    $MICROVM_LANE_OUT. Raises LaneError if the lane itself fails, LaneTimeout
    after `timeout` seconds.
    """
    reason = lane_available()
    if reason:
        raise LaneError(f"lane unavailable: {reason}")
    t0 = time.monotonic()
    kernel = find_kernel()
    initrd = initrd_path(kernel)
    with tempfile.TemporaryDirectory(prefix="microvm-lane-") as tmp:
        ctl = Path(tmp) / "ctl"
        ctl.mkdir()
        out = Path(out_dir) if out_dir is not None else Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        out = out.resolve()
        inside_out = out_path or str(out)
        (ctl / "config").write_text(f"LANE_OUT_PATH={shlex.quote(inside_out)}\n")
        full_env = lane_env(env, inside_out, tty=stream and sys.stdout.isatty())
        (ctl / "run.sh").write_text(run_script(argv, cwd or os.getcwd(), full_env))
        cmd = qemu_command(boot_image(kernel), initrd, ctl, out, smp=smp or DEFAULT_SMP,
                           mem_mib=mem_mib, debug=debug)
        console = _Console(stream, passthrough=debug)
        qemu_status = _run_qemu(cmd, console, timeout)
        try:
            returncode = int((ctl / "status").read_text())
        except (OSError, ValueError) as e:
            raise LaneError(f"the lane stopped before the command finished (QEMU exit {qemu_status}); "
                            f"console tail:\n{console.tail()}") from e
    return LaneResult(returncode, "".join(console.output), time.monotonic() - t0)


def _run_qemu(cmd: list[str], console: _Console, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LaneTimeout(f"no result after {timeout:.0f} s; console tail:\n{console.tail()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                console.feed(chunk, final=not chunk)
                if not chunk:
                    break
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microvm.lane", description=__doc__.splitlines()[0])
    parser.add_argument("--cwd", help="working directory inside (default: the current one)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--env", action="append", default=[], metavar="K=V")
    parser.add_argument("--out-dir", type=Path, help="host dir shared read-write (default: a temp dir)")
    parser.add_argument("--smp", type=int)
    parser.add_argument("--mem", type=int, default=2048, metavar="MIB")
    parser.add_argument("--debug", action="store_true", help="show kernel messages and trace the init")
    parser.add_argument("argv", nargs="+", metavar="CMD")
    ns = parser.parse_args(args)
    env = dict(item.partition("=")[::2] for item in ns.env)
    try:
        result = run_in_lane(ns.argv, cwd=ns.cwd, env=env, timeout=ns.timeout, out_dir=ns.out_dir,
                             smp=ns.smp, mem_mib=ns.mem, debug=ns.debug)
    except LaneError as e:
        print(f"microvm.lane: {e}", file=sys.stderr)
        return 124 if isinstance(e, LaneTimeout) else 125  # as timeout(1) and env(1) do
    print(f"microvm.lane: exit {result.returncode} after {result.wall_s:.1f} s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
