"""The run path as a user sees it with our Linux guest: what lands in stdout
and console, and how failures of the guest are named."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from microvm.errors import GuestError, MicroVMError
from microvm.kernelbuild import find_default_kernel
from microvm.machine import GuestPanicError, MicroVM
from microvm.specs import Drive
from tests.support.resources import open_fds

MIB = 1 << 20


@pytest.fixture(scope="module")
def vmlinux() -> str:
    art = find_default_kernel()
    if art is None:
        pytest.fail("no guest kernel built: run `microvm kernel build`")
    return str(art.vmlinux)


def test_stdout_is_the_commands_and_console_the_kernels(vmlinux: str) -> None:
    got_console: list[bytes] = []
    got_stdout: list[bytes] = []
    r = MicroVM(vmlinux, append="loglevel=7", console=got_console.append, stdout=got_stdout.append).run(
        ["sh", "-c", "echo out; echo err >&2; echo 'kernel says' >/dev/kmsg; poweroff -f"], timeout=120)
    assert r.stdout == b"out\nerr\n"
    assert b"Linux version" in r.console and b"kernel says" in r.console
    assert b"out\n" not in r.console and b"err\n" not in r.console
    assert b"".join(got_stdout) == r.stdout and b"".join(got_console) == r.console


def test_cli_console_flag_shows_the_console_and_the_output(vmlinux: str) -> None:
    p = subprocess.run([sys.executable, "-m", "microvm", "run", "--kernel", vmlinux, "--console",
                        "--append", "loglevel=7", "--", "echo", "hi"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert b"hi\n" in p.stdout and b"Linux version" in p.stdout


@pytest.mark.parametrize("how", ["vmlinux", "bzImage"], ids=["read-by-host", "sent-by-init"])
def test_full_log_puts_every_kernel_message_in_the_console_once(how: str) -> None:
    """The vmlinux's symbols locate the log in guest memory; with a bzImage, init sends it."""
    art = find_default_kernel()
    assert art is not None
    r = MicroVM(art.vmlinux if how == "vmlinux" else art.bzimage, full_log=True).run(["dmesg"], timeout=120)
    assert r.exit_code == 0
    log = r.stdout.splitlines()  # the log as the command saw it; the console's is taken later
    assert len(log) > 50 and b"Linux version" in log[0], r.stdout[:500]
    console = [line.rstrip(b"\r") for line in r.console.splitlines()]
    rest = iter(console)
    assert all(line in rest for line in log), "a dmesg line is missing from the console, or out of order"
    assert all(console.count(line) == log.count(line) for line in log), "a dmesg line is in the console twice"
    assert b"Linux version" not in r.stdout.replace(log[0], b"")  # stdout is still the command's alone


def test_full_log_shows_what_led_to_a_panic(vmlinux: str) -> None:
    """Under quiet an info line never crosses the UART (see the next test); read
    from guest memory after the panic, it is in the panic's report."""
    with pytest.raises(GuestPanicError, match="Attempted to kill init") as e:
        MicroVM(vmlinux, full_log=True, append="rdinit=/bin/false").run(["true"], timeout=300)
    assert "Run /bin/false as init process" in str(e.value)


def test_full_log_after_a_poweroff_and_from_the_cli(vmlinux: str) -> None:
    r = MicroVM(vmlinux, full_log=True).run(["poweroff"], timeout=120)
    assert r.reason == "poweroff" and b"Linux version" in r.console
    p = subprocess.run([sys.executable, "-m", "microvm", "run", "--kernel", vmlinux, "--full-log", "--",
                        "echo", "hi"], capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(b"hi\n") and b"Linux version" in p.stdout and b"Run /init" in p.stdout


def test_devices_survive_whatever_append_says(vmlinux: str, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(MIB))
    r = MicroVM(vmlinux, drives=[Drive(disk)], append='quiet x="a b c" init.y=1').run(
        ["sh", "-c", "ls /dev/vda /dev/hvc0"], timeout=120)
    assert r.stdout == b"/dev/hvc0\n/dev/vda\n", r.console


def test_an_unmountable_rootfs_is_an_error(vmlinux: str, tmp_path: Path) -> None:
    zero = tmp_path / "zero.img"
    zero.write_bytes(bytes(64 * MIB))
    with pytest.raises(GuestError, match=r"cannot mount root /dev/vda \(ext4\)"):
        MicroVM(vmlinux, rootfs=zero).run(["echo", "hi"], timeout=120)
    p = subprocess.run([sys.executable, "-m", "microvm", "run", "--kernel", vmlinux, "--rootfs", str(zero),
                        "--", "echo", "hi"], capture_output=True, timeout=300)
    assert p.returncode == 1 and p.stdout == b""
    assert p.stderr.startswith(b"microvm: error: cannot mount root /dev/vda") and p.stderr.count(b"\n") == 1


def test_a_panic_ends_the_run_even_with_panic_0(vmlinux: str) -> None:
    # panic=0: the kernel would spin for ever; the panic line ends the run.
    with pytest.raises(GuestPanicError, match="Attempted to kill init") as e:
        MicroVM(vmlinux, append="panic=0 rdinit=/bin/false").run(["true"], timeout=300)
    assert "Run /bin/false as init process" not in str(e.value)  # quiet: only warnings and worse


def test_a_garbage_initrd_says_it_could_not_be_unpacked(vmlinux: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(random.Random(7).randbytes(64 * 1024))
    with pytest.raises(GuestPanicError, match="the initrd could not be unpacked"):
        MicroVM(vmlinux, initrd=garbage).run(["true"], timeout=300)


def test_random_interrupts_with_linux_leave_nothing_behind(vmlinux: str) -> None:
    """20 Linux runs, each hit at a random instant by SIGINT, stop(), kill() or nothing."""
    rng = random.Random(4321)
    MicroVM(vmlinux, mem_mib=64).run(["true"], timeout=120)  # warm caches
    proc = psutil.Process()
    before = open_fds(proc), proc.num_threads()
    main = threading.main_thread().ident
    assert main is not None
    outcomes: list[str] = []
    for _ in range(20):
        action = rng.choice(["sigint", "stop", "kill", "none"])
        m = MicroVM(vmlinux, mem_mib=64)
        fire = {"sigint": lambda: signal.pthread_kill(main, signal.SIGINT), "stop": m.stop, "kill": m.kill,
                "none": lambda: None}[action]
        t = threading.Timer(rng.uniform(0, 2.0), fire)
        t.start()
        try:
            try:
                m.run(["sleep", "1"], timeout=120)
                outcome = "ok"
            finally:
                t.join()
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        except MicroVMError as e:
            outcome = type(e).__name__
        outcomes.append(f"{action}:{outcome}")
        assert m.vm is None
    # A joined thread may still be listed by the kernel for a moment while it exits.
    deadline = time.monotonic() + 2.0
    while (now := (open_fds(proc), proc.num_threads())) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert now == before, outcomes


SECCOMP_RUN = """
import sys
sys.path.insert(0, {repo!r})
from microvm.machine import Drive, MicroVM
r = MicroVM({kernel!r}, seccomp="kill", drives=[Drive({disk!r})], vsock={sock!r}).run(
    ["sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=64k count=16 oflag=direct 2>/dev/null && sync && "
                 "dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | wc -c && head -c 16 /dev/hwrng | wc -c"],
    timeout=120)
print(r.exit_code, r.output.split())
"""


def test_a_linux_guest_with_disk_rng_and_vsock_runs_under_seccomp_kill(vmlinux: str, tmp_path: Path) -> None:
    """The policy holds what the device models do for a real guest: a kill would end the child with SIGSYS."""
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4 * MIB))
    repo = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, "-c", SECCOMP_RUN.format(repo=repo, kernel=vmlinux, disk=str(disk),
                                                                 sock=str(tmp_path / "v.sock"))],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stderr[-3000:])
    assert p.stdout.strip() == "0 ['1048576', '16']", p.stdout


def test_a_jailed_linux_guest_with_disk_rng_vsock_and_its_full_log(vmlinux: str, tmp_path: Path) -> None:
    """A real guest's devices work in the jail (everything opened before it, the
    vsock's directory bound in), under seccomp "kill", with its whole kernel log."""
    from microvm.machine import Drive, MicroVM

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4 * MIB))
    r = MicroVM(vmlinux, jail=True, seccomp="kill", full_log=True, drives=[Drive(str(disk))],
                vsock=str(tmp_path / "v.sock")).run(
        ["sh", "-c", "echo jailed > /dev/vda && sync && head -c 16 /dev/hwrng | wc -c"], timeout=120)
    assert r.exit_code == 0, r.console[-3000:]
    assert r.output.split() == ["16"], r.output
    assert disk.read_bytes().startswith(b"jailed\n")
    assert b"Run /init as init process" in r.console  # read from guest memory by the jailed VMM
