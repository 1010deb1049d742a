"""microvm.lane without QEMU (plus one real run, marked `lane`)."""

from __future__ import annotations

import io
import json
import lzma
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from microvm import lane
from microvm.errors import MicroVMError
from microvm.lane import cli, initrd, kernel, run

AWKWARD_ARGS = ["a b", "it's", '"q"', "$HOME", "\\back", "", "ünï", "x\ny", "*", "--", "-c"]


@pytest.fixture(autouse=True)
def _frozen_lanes_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MICROVM_LANE_KEEP_FROZEN would hold every frozen 'lane' below until it ends."""
    monkeypatch.delenv(run.KEEP_FROZEN_ENV, raising=False)


def test_run_script_passes_argv_cwd_and_env_intact(tmp_path: Path) -> None:
    probe = "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), dict(os.environ)]))"
    env = {"PATH": "/usr/bin:/bin", "FOO": "va'l ue\n$x", "EMPTY": ""}
    script = run.run_script([sys.executable, "-c", probe, *AWKWARD_ARGS], str(tmp_path), env)
    # The lane runs it as `env -i chroot /newroot /bin/sh -c "$(cat run.sh)"`.
    out = subprocess.run(["env", "-i", "/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    argv, cwd, seen_env = json.loads(out.stdout)
    assert argv == AWKWARD_ARGS
    assert cwd == str(tmp_path)
    assert {k: seen_env[k] for k in env} == env


def test_run_script_exit_status_and_bad_cwd(tmp_path: Path) -> None:
    script = run.run_script(["sh", "-c", "exit 3"], str(tmp_path), {"PATH": "/usr/bin:/bin"})
    assert subprocess.run(["/bin/sh", "-c", script], check=False).returncode == 3
    script = run.run_script(["true"], str(tmp_path / "missing"), {})
    assert subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=False).returncode == 127


def test_run_script_refuses_what_a_shell_cannot_carry() -> None:
    with pytest.raises(ValueError, match="empty"):
        run.run_script([], "/", {})
    with pytest.raises(ValueError, match="A-B"):
        run.run_script(["true"], "/", {"A-B": "x"})


def test_lane_env_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/host/bin")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("SECRET_TOKEN", "x")
    monkeypatch.setenv("MICROVM_CACHE", "/cache")
    env = run.lane_env({"FOO": "1", "PATH": "/mine"}, "/out")
    assert env["PATH"] == "/mine"
    assert env["HOME"] == "/root"
    assert env["MICROVM_LANE"] == "1" and env["MICROVM_LANE_OUT"] == "/out"
    assert env["FOO"] == "1"
    assert env["MICROVM_CACHE"] == "/cache"  # microvm inside finds what was built outside
    assert "SECRET_TOKEN" not in env  # only a short list of host variables is carried
    assert env["TERM"] == "dumb"
    monkeypatch.setenv("TERM", "xterm")
    assert run.lane_env(None, "/out", tty=True)["TERM"] == "xterm"
    assert run.lane_env({"TERM": "vt100"}, "/out")["TERM"] == "vt100"


def test_qemu_command_line() -> None:
    cmd = run.qemu_command(Path("/k/vmlinux"), Path("/k/initrd"), Path("/c"), Path("/o"), smp=2, mem_mib=1024)
    joined = shlex.join(cmd)
    assert cmd[0] == run.QEMU
    assert "-accel tcg,thread=multi" in joined and "-smp 2" in joined and "-m 1024" in joined
    assert "-cpu max,+svm" in joined and "-M q35" in joined and "-no-reboot" in joined
    assert "-kernel /k/vmlinux" in joined and "-initrd /k/initrd" in joined
    append = cmd[cmd.index("-append") + 1]
    assert "console=ttyS0" in append and "panic=-1" in append and "quiet" in append
    shares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-virtfs"]
    assert shares[0].startswith("local,path=/,mount_tag=host,") and "readonly=on" in shares[0]
    assert "mount_tag=ctl" in shares[1] and "readonly" not in shares[1]
    assert "path=/o,mount_tag=out" in shares[2]
    single = run.qemu_command(Path("k"), Path("i"), Path("c"), Path("o"), smp=1, debug=True)
    assert single[single.index("-accel") + 1] == "tcg"
    assert "lane.debug" in single[single.index("-append") + 1]


def test_init_script_is_complete() -> None:
    init = initrd.INIT_SCRIPT
    assert "@" not in init.replace("@MODULES@", "").replace("@NINEP@", "").replace(
        "@START@", "").replace("@END@", "")
    assert "reboot -f" in init and "/ctl/status" in init


def test_missing_qemu_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = run.shutil.which
    monkeypatch.setattr(run.shutil, "which", lambda name: None if name == run.QEMU else real_which(name))
    reason = lane.lane_available()
    assert reason is not None and run.QEMU in reason
    with pytest.raises(lane.LaneError, match="unavailable"):
        lane.run_in_lane(["true"])
    assert issubclass(lane.LaneError, MicroVMError)


def test_console_keeps_only_the_command_output(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    console = run._Console(stream=True)
    stream = (b"[    0.1] boot noise\r\n" + initrd.START_MARK.encode() + b"\r\n"
              + b"hello\r\n\r\nw\xc3\xb6rld\r\n" + b"\r\n" + initrd.END_MARK.encode() + b"\r\n"
              + b"[    5.0] reboot: Restarting system\r\n")
    for i in range(0, len(stream), 7):  # markers and UTF-8 split across reads
        console.feed(stream[i:i + 7])
    console.feed(b"", final=True)
    assert "".join(console.output) == "hello\n\nwörld\n"
    assert shown.getvalue() == "hello\n\nwörld\n"
    assert "Restarting system" in console.tail() and "boot noise" in console.tail()


def test_console_output_without_final_newline() -> None:
    console = run._Console(stream=False)
    console.feed(f"{initrd.START_MARK}\npartial\n{initrd.END_MARK}\n".encode(), final=True)
    assert "".join(console.output) == "partial\n"


def _fake_ko(path: Path, depends: str) -> None:
    """A minimal ELF64 with the two sections modinfo() reads: .modinfo and .shstrtab."""
    modinfo = f"license=GPL\0depends={depends}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    sh_off = data_off + len(modinfo) + len(shstrtab)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, sh_off)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, 3, 2)
    sections = [bytes(64),
                struct.pack("<IIQQQQ", 1, 1, 0, 0, data_off, len(modinfo)).ljust(64, b"\0"),
                struct.pack("<IIQQQQ", 10, 3, 0, 0, data_off + len(modinfo), len(shstrtab)).ljust(64, b"\0")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(ehdr) + modinfo + shstrtab + b"".join(sections))


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    _fake_ko(tmp_path / "kernel/net/bridge.ko", "llc,stp")
    _fake_ko(tmp_path / "kernel/net/stp.ko", "llc")
    _fake_ko(tmp_path / "kernel/net/llc.ko", "")
    _fake_ko(tmp_path / "kernel/kvm/kvm-amd.ko", "kvm")
    _fake_ko(tmp_path / "kernel/kvm/kvm.ko", "")
    (tmp_path / "modules.builtin").write_text("kernel/virtio/virtio.ko\n")
    assert initrd.modinfo(tmp_path / "kernel/net/bridge.ko")["depends"] == "llc,stp"
    order = [p.name for p in initrd.module_order(tmp_path, ["kvm-amd", "virtio", "bridge"])]
    assert order == ["kvm.ko", "kvm-amd.ko", "llc.ko", "stp.ko", "bridge.ko"]
    with pytest.raises(lane.LaneError, match="nosuch"):
        initrd.module_order(tmp_path, ["nosuch"])


def test_extract_vmlinux_from_an_xz_bzimage(tmp_path: Path) -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ) + struct.pack("<I", len(elf))
    setup_sects = 2
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    image += bytes(16) + payload
    (tmp_path / "vmlinuz").write_bytes(bytes(image))
    assert kernel.extract_vmlinux(tmp_path / "vmlinuz", tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf
    (tmp_path / "plain").write_bytes(b"not a kernel" * 100)
    assert not kernel.extract_vmlinux(tmp_path / "plain", tmp_path / "nothing")


def test_kernel_package_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"depends": "linux-image-amd64\n  Depends: linux-image-6.1.0-50-amd64\n"}
    monkeypatch.setattr(kernel, "_run", lambda argv, cwd=None: answers.get(argv[1], ""))
    assert kernel._wanted_packages() == ["linux-image-6.1.0-50-amd64", "linux-image-6.1.0-50-amd64-unsigned"]
    answers = {"depends": "", "search": ("linux-image-6.1.0-9-amd64 - Linux 6.1\n"
                                         "linux-image-6.1.0-47-amd64 - Linux 6.1\n")}
    assert kernel._wanted_packages()[0] == "linux-image-6.1.0-47-amd64"
    answers = {}
    with pytest.raises(lane.LaneError, match="apt"):
        kernel._wanted_packages()


def test_cached_kernel_is_used_without_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path))
    for n in (9, 47):
        boot = tmp_path / "lane" / f"6.1.0-{n}-amd64" / "boot"
        boot.mkdir(parents=True)
        (boot / f"vmlinuz-6.1.0-{n}-amd64").write_bytes(b"k")

    def no_apt(argv: list[str], cwd: str | None = None) -> str:
        raise AssertionError("apt consulted")

    monkeypatch.setattr(kernel, "_run", no_apt)
    assert kernel.find_kernel().release == "6.1.0-47-amd64"


def test_main_passes_options_and_status(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_run(argv: list[str], **kw: object) -> lane.LaneResult:
        seen.clear()
        seen.update(kw, argv=argv)
        return lane.LaneResult(7, "", 0.1)

    monkeypatch.setattr(cli, "run_in_lane", fake_run)
    monkeypatch.setenv("HOST_ONLY", "from the host")
    monkeypatch.delenv("NOWHERE", raising=False)
    argv = ["--cwd", "/r", "--out", str(tmp_path), "--timeout", "90", "--smp", "2", "--env", "A=b=c",
            "--env", "HOST_ONLY", "--env", "NOWHERE", "--", "cmd", "--", "-x"]
    assert lane.main(argv) == 7
    assert seen["argv"] == ["cmd", "--", "-x"]
    assert seen["cwd"] == "/r" and seen["out_dir"] == tmp_path and seen["timeout"] == 90 and seen["smp"] == 2
    assert seen["env"] == {"A": "b=c", "HOST_ONLY": "from the host"}  # a bare name unset on the host: left out

    # The command starts at its first word: its own options are its own, no `--` needed.
    assert lane.main(["python3", "-c", "x", "--timeout", "1"], cwd="/repo") == 7
    assert seen["argv"] == ["python3", "-c", "x", "--timeout", "1"]
    assert seen["cwd"] == "/repo" and seen["timeout"] == 1800 and seen["out_dir"] is None

    def timing_out(argv: list[str], **kw: object) -> lane.LaneResult:
        raise lane.LaneTimeout("slow")

    monkeypatch.setattr(cli, "run_in_lane", timing_out)
    assert lane.main(["true"]) == 124


@pytest.mark.parametrize("args", [[], ["--"], ["--timeout", "0", "true"], ["--timeout", "x", "true"],
                                  ["--env", "A-B=1", "true"], ["--smp", "0", "true"], ["--mem", "1.5", "true"],
                                  ["--bogus", "true"]])
def test_main_refuses_bad_options_before_any_lane(args: list[str], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "run_in_lane", None)  # a lane started would fail loudly
    with pytest.raises(SystemExit) as exited:
        lane.main(args)
    assert exited.value.code == 2
    assert "usage: tests/hwvirt/run" in capsys.readouterr().err


def test_hwvirt_run_documents_its_options() -> None:
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([str(repo / "tests/hwvirt/run"), "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("usage: tests/hwvirt/run [OPTION ...] [--] CMD")
    for option in ("--cwd DIR", "--out DIR", "--timeout SECONDS", "--env K=V", "--smp N", "--mem MIB", "--debug"):
        assert option in out.stdout
    # Compared without whitespace: argparse wraps its help, and breaks a path at a hyphen (/work/ci-try)
    assert f"workingdirectoryofthecommand(default:{repo})" in "".join(out.stdout.split())


@pytest.mark.lane
def test_real_lane_round_trip(tmp_path: Path) -> None:
    reason = lane.lane_available()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "out"
    script = ('test -c /dev/kvm && echo hello-from-lane; echo "$1" >"$MICROVM_LANE_OUT/proof"; exit 3')
    result = lane.run_in_lane(["sh", "-c", script, "sh", "it's a b"], out_dir=out, timeout=600, stream=False)
    assert result.returncode == 3, result.output
    assert "hello-from-lane" in result.output
    assert (out / "proof").read_text() == "it's a b\n"


def test_a_frozen_lane_is_caught_by_its_idle_cpu_not_its_timeout() -> None:
    """QEMU asleep for good (seen now and then under nested SVM): a process using no CPU."""
    t0 = time.monotonic()
    with pytest.raises(lane.LaneFrozen, match="the lane froze: QEMU used no CPU and did no I/O for"):
        run._run_qemu(["sleep", "60"], run._Console(stream=False), timeout=60, freeze_after=1.5)
    assert time.monotonic() - t0 < 10


def test_a_frozen_lane_is_kept_for_a_debugger_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """MICROVM_LANE_KEEP_FROZEN: the frozen QEMU is left running, its pid named, until it ends."""
    monkeypatch.setenv(run.KEEP_FROZEN_ENV, "1")
    t0 = time.monotonic()
    with pytest.raises(lane.LaneFrozen):
        run._run_qemu(["sleep", "4"], run._Console(stream=False), timeout=60, freeze_after=1.5)
    assert time.monotonic() - t0 >= 4  # it waited for the process, which nobody killed
    assert re.search(r"QEMU \(pid \d+\) kept frozen for a debugger", capsys.readouterr().err)


def test_a_frozen_lanes_report_names_its_threads_and_where_they_sleep() -> None:
    with pytest.raises(lane.LaneTimeout) as e:
        run._run_qemu(["sleep", "60"], run._Console(stream=False), timeout=60, freeze_after=1.5)
    assert re.search(r"its threads:\n  \d+ sleep: S \(sleeping\), in \S+\n", str(e.value)), str(e.value)


def test_a_lane_doing_io_on_little_cpu_is_not_taken_for_a_frozen_one() -> None:
    """Its guest waiting on 9p reads of a slow host disk, say: QEMU reads and
    writes now and then, on next to no CPU."""
    trickle = ["sh", "-c", "for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done"]
    assert run._run_qemu(trickle, run._Console(stream=False), timeout=60, freeze_after=1.5) == 0


def test_a_busy_lane_is_not_taken_for_a_frozen_one() -> None:
    spin = [sys.executable, "-c", "import time\nt = time.monotonic() + 3\nwhile time.monotonic() < t: pass"]
    assert run._run_qemu(spin, run._Console(stream=False), timeout=60, freeze_after=1.5) == 0


def test_a_frozen_lanes_report_asks_qemu_where_its_guest_is(tmp_path: Path) -> None:
    """A real QEMU, stopped before its first instruction (-S): no CPU, no I/O.
    The report carries the monitor's answers: the run state, the vCPU's
    thread, where vCPU 0 is and whether it is halted."""
    if shutil.which(run.QEMU) is None:
        pytest.skip(f"{run.QEMU} not found")
    monitor = tmp_path / "monitor"
    cmd = [run.QEMU, "-S", "-display", "none", "-nodefaults", "-monitor", f"unix:{monitor},server=on,wait=off"]
    with pytest.raises(lane.LaneFrozen) as e:
        run._run_qemu(cmd, run._Console(stream=False), timeout=60, freeze_after=1.5, monitor=monitor)
    report = str(e.value)
    assert "its guest:\n  VM status: paused (prelaunch)\n  * CPU #0: thread_id=" in report, report
    assert re.search(r"\n  EIP=0000fff0 .* HLT=0\n  CR0=60000010 ", report), report


# A stand-in for a frozen QEMU: a human monitor on a unix socket, no CPU used
# until a key is pressed there; then (if it "wakes") a second of work, and the end.
FAKE_FROZEN_QEMU = """
import socket, sys, time
srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen()
wakes = sys.argv[2] == "wakes"
while True:
    conn, _ = srv.accept()
    conn.sendall(b"QEMU monitor\\r\\n(qemu) ")
    got = b""
    while b"\\n" not in got:
        got += conn.recv(100)
    conn.sendall(got.strip() + b"\\r\\n(qemu) ")
    conn.close()
    if b"sendkey" in got and wakes:
        t = time.monotonic() + 1
        while time.monotonic() < t:
            pass
        print("woken", flush=True)
        sys.exit(0)
"""


def test_a_frozen_lane_woken_by_a_key_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = tmp_path / "monitor"
    cmd = [sys.executable, "-c", FAKE_FROZEN_QEMU, str(monitor), "wakes"]
    console = run._Console(stream=False)
    assert run._run_qemu(cmd, console, timeout=60, freeze_after=30, monitor=monitor, nudge_after=2) == 0
    assert "woken" in console.tail()
    assert re.search(r"lane: QEMU was idle \d+ s; a key pressed through its monitor woke it", capsys.readouterr().err)


def test_a_frozen_lane_a_key_does_not_wake_is_reported_frozen(tmp_path: Path) -> None:
    monitor = tmp_path / "monitor"
    cmd = [sys.executable, "-c", FAKE_FROZEN_QEMU, str(monitor), "sleeps"]
    t0 = time.monotonic()
    with pytest.raises(lane.LaneFrozen, match=r"did no I/O for \d+ s \(a key pressed through its monitor after "
                                              r"\d+ s did not wake it\)"):
        run._run_qemu(cmd, run._Console(stream=False), timeout=60, freeze_after=5, monitor=monitor, nudge_after=1.5)
    assert time.monotonic() - t0 < 30


def test_a_monitor_that_does_not_answer_is_reported_as_such(tmp_path: Path) -> None:
    assert run._ask_monitor(tmp_path / "none", ["info status"], wait=0.5).startswith(
        "  the monitor did not answer: ")
