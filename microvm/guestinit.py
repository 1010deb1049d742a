"""The guest's userspace: busybox and our /init, as an initramfs.

The base archive (busybox + /init) is built once and cached on disk. Each
run appends a second, tiny cpio archive with the command to run (Linux
unpacks concatenated archives in order, buffer-format.rst), so starting a VM
never rebuilds or recompresses the base.

/init reports to the host through the control device (devices/control.py)
with busybox `devmem`: a mark when it starts, and the command's exit status
when it is done.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from microvm.arch.x86_64.layout import CONTROL_BASE
from microvm.devices.control import (
    FAIL_ROOT_MOUNT,
    MARK_COMMAND,
    MARK_COMMAND_ON_CONSOLE,
    MARK_INIT,
    REG_EXIT,
    REG_FAIL,
    REG_MARK,
    REG_POWER,
)
from microvm.initramfs import Cpio, add_busybox, busybox_path
from microvm.kernellog import FULL_LOG_ARG

INIT_SCRIPT = f"""#!/bin/sh
# microvm guest init (PID 1): mount, tell the host we are here, run the
# command, drain the console, report the exit status.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
devmem {CONTROL_BASE + REG_MARK:#x} 32 {MARK_INIT}
hostname microvm

sendlog() {{
    # MicroVM(full_log=True) with a kernel whose log the host cannot find in
    # its memory (printk.FullLog): the whole log over hvc1, before init reports
    # (hvc's write returns once the host has the data). -opost: whole blocks,
    # not a write per line end.
    [ -n "$fulllog" ] && [ -c /dev/hvc1 ] || return 0
    exec 4>/dev/hvc1
    stty -F /dev/hvc1 -opost 2>/dev/null
    dmesg >&4
    exec 4>&-
}}

power() {{
    # busybox halt/poweroff/reboot signal PID 1: tell the host, which ends the VM.
    stty -F /dev/ttyS0 -echo 2>/dev/null
    sync
    sendlog
    devmem {CONTROL_BASE + REG_POWER:#x} 32 $1
    while :; do sleep 1; done
}}
trap 'power 1' USR2
trap 'power 2' TERM
trap 'power 3' USR1

[ -f /microvm/env ] && . /microvm/env
ln -s /microvm /run/microvm
cd /root 2>/dev/null || cd /

# root=/dev/vdX on the kernel command line: the command runs chrooted into
# that filesystem (our init stays in charge of reporting to the host).
run=/bin/sh
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=/dev/*) root=${{arg#root=}} ;;
        root=LABEL=*|root=UUID=*) root=$(findfs "${{arg#root=}}") ;;
        rootfstype=*) rootfstype=${{arg#rootfstype=}} ;;
        # A second and further NIC's address (the kernel's ip= serves only one).
        {FULL_LOG_ARG}) fulllog=1 ;;
        microvm.ip=*) v=${{arg#microvm.ip=}}; ip link set "${{v%%,*}}" up; ip addr add "${{v#*,}}" dev "${{v%%,*}}" ;;
    esac
done
if [ -n "$root" ]; then
    mkdir -p /newroot
    # A read-only disk (Drive(read_only=True)) is mounted read-only at once.
    ro=
    [ "$(cat /sys/class/block/${{root#/dev/}}/ro 2>/dev/null)" = 1 ] && ro="-o ro"
    if mount -t ${{rootfstype:-ext4}} $ro "$root" /newroot 2>/run/mount-error; then
        for fs in proc sys dev run tmp; do mkdir -p /newroot/$fs; done
        mount -t proc proc /newroot/proc
        mount -t sysfs sysfs /newroot/sys
        mount -t devtmpfs devtmpfs /newroot/dev
        mount -t tmpfs tmpfs /newroot/run
        mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
        cp /microvm/cmd /newroot/run/microvm-cmd 2>/dev/null
        cp -a /microvm /newroot/run/microvm
        run="chroot /newroot /bin/sh"
    else
        # Never fall back to the initramfs: the host reports this line.
        echo "microvm: cannot mount root $root (${{rootfstype:-ext4}}): $(cat /run/mount-error)" >/dev/console
        sendlog
        devmem {CONTROL_BASE + REG_FAIL:#x} 32 {FAIL_ROOT_MOUNT}
        while :; do sleep 1; done
    fi
fi

if [ -f /microvm/cmd ]; then
    # The command's output goes to virtio-console (hvc0) when there is one:
    # whole buffers, and hvc returns from write() only once the host took
    # them, so nothing is in flight when we report the status.
    # (Else the serial port: /dev/console may be the kernel's log, hvc1.)
    out=/dev/ttyS0 mark={MARK_COMMAND_ON_CONSOLE}
    [ -c /dev/hvc0 ] && out=/dev/hvc0 mark={MARK_COMMAND}
    # fd 3 holds the tty open, so the settings below last for the whole run
    # (a tty forgets them when its last fd closes). -opost: exact bytes, no
    # CR before LF. stty applies them with TCSADRAIN, which also waits for
    # output already queued to go out.
    exec 3>$out
    stty -F $out -opost -echo 2>/dev/null
    devmem {CONTROL_BASE + REG_MARK:#x} 32 $mark
    # Like subprocess.run(capture_output=True): stdout and stderr are a pipe,
    # not a terminal, so programs write in large blocks.
    cmdfile=/microvm/cmd
    [ "$run" != /bin/sh ] && cmdfile=/run/microvm-cmd
    {{ $run $cmdfile </dev/null 2>&1; echo $? >/run/status; }} | cat >&3
    status=$(cat /run/status)
    exec 3>&-
else
    # A shell on the serial port (ttyS0: /dev/console may be hvc1, where the
    # kernel's messages go). Hardware flow control: when the tty's input
    # buffer fills, the guest drops RTS and the host holds its input back
    # (Serial.offer), so piped input of any size arrives whole. The host
    # sends input only after this mark, once the port is set up.
    stty -F /dev/ttyS0 crtscts 2>/dev/null
    devmem {CONTROL_BASE + REG_MARK:#x} 32 {MARK_COMMAND_ON_CONSOLE}
    # The shell must not lead the session: when a session leader exits, Linux
    # hangs up its terminal (drivers/tty/tty_jobctrl.c, disassociate_ctty),
    # and the hangup discards output the UART has not sent yet, such as the
    # shell's last lines. So a plain sh leads, and outlives the shell until
    # that output has drained (stty applies settings with TCSADRAIN).
    shell="/bin/sh -l"
    [ "$run" != /bin/sh ] && shell="chroot /newroot /bin/sh -l"
    # (TTOU ignored: should the shell leave another process group in the
    # foreground, stty from ours would otherwise be stopped.) The leader
    # opens ttyS0 itself, which makes it the session's controlling tty.
    setsid /bin/sh -c "exec 0<>/dev/ttyS0 1>&0 2>&0; $shell; s=\\$?; trap '' TTOU; stty -echo 2>/dev/null; exit \\$s"
    status=$?
fi
sync
[ -n "$root" ] && mount -o remount,ro /newroot 2>/dev/null
stty -F /dev/ttyS0 -echo
sendlog
devmem {CONTROL_BASE + REG_EXIT:#x} 32 $status
while :; do sleep 1; done
"""


def _cache_dir() -> Path:
    return Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm") / "initramfs"


@functools.cache
def base_initramfs() -> bytes:
    """busybox + /init, uncompressed (the kernel unpacks it faster than gzip)."""
    busybox = busybox_path()
    # Keyed by the busybox file's identity (not its 2 MB of contents) and our init.
    st = busybox.stat()
    ident = f"{busybox.resolve()}:{st.st_size}:{st.st_mtime_ns}\n{INIT_SCRIPT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    path = _cache_dir() / f"base-{key}.cpio"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "microvm", "mnt"):
        cpio.add_dir(d)
    cpio.add_char_device("dev/console", 5, 1)
    cpio.add_char_device("dev/null", 1, 3, 0o666)
    cpio.add_file("init", INIT_SCRIPT.encode(), 0o755)
    cpio.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.add_file("etc/group", b"root:x:0:\n")
    add_busybox(cpio, busybox=busybox)
    data = cpio.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per thread, not only per process: a SandboxPool boots its first VMs at once, in threads.
    tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def command_archive(argv: Sequence[str] | None, env: Mapping[str, str] | None = None,
                    files: Mapping[str, bytes] | None = None) -> bytes:
    """The per-run archive: /microvm/cmd (the command as a shell line), env, and
    extra files under /microvm/ (paths checked by checks.guest_files)."""
    cpio = Cpio()
    cpio.add_dir("microvm")
    for path, data in sorted((files or {}).items()):
        cpio.add_file(f"microvm/{path}", data, 0o644)  # its directories come implicitly, 0755
    if argv:
        cpio.add_file("microvm/cmd", (shlex.join(argv) + "\n").encode())
    if env:
        lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items() if k.isidentifier())
        cpio.add_file("microvm/env", lines.encode())
    return cpio.to_bytes()


def initramfs_for(argv: Sequence[str] | None, env: Mapping[str, str] | None = None,
                  files: Mapping[str, bytes] | None = None) -> bytes:
    return base_initramfs() + command_archive(argv, env, files)
