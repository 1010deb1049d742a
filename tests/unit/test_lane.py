"""microvm.lane without QEMU (plus one real run, marked `lane`)."""

from __future__ import annotations

import io
import json
import lzma
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from microvm import lane, lanekernel
from microvm.errors import MicroVMError

AWKWARD_ARGS = ["a b", "it's", '"q"', "$HOME", "\\back", "", "ünï", "x\ny", "*", "--", "-c"]


def test_run_script_passes_argv_cwd_and_env_intact(tmp_path: Path) -> None:
    probe = "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), dict(os.environ)]))"
    env = {"PATH": "/usr/bin:/bin", "FOO": "va'l ue\n$x", "EMPTY": ""}
    script = lane.run_script([sys.executable, "-c", probe, *AWKWARD_ARGS], str(tmp_path), env)
    # The lane runs it as `env -i chroot /newroot /bin/sh -c "$(cat run.sh)"`.
    out = subprocess.run(["env", "-i", "/bin/sh", "-c", script], capture_output=True, text=True, check=True)
    argv, cwd, seen_env = json.loads(out.stdout)
    assert argv == AWKWARD_ARGS
    assert cwd == str(tmp_path)
    assert {k: seen_env[k] for k in env} == env


def test_run_script_exit_status_and_bad_cwd(tmp_path: Path) -> None:
    script = lane.run_script(["sh", "-c", "exit 3"], str(tmp_path), {"PATH": "/usr/bin:/bin"})
    assert subprocess.run(["/bin/sh", "-c", script], check=False).returncode == 3
    script = lane.run_script(["true"], str(tmp_path / "missing"), {})
    assert subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=False).returncode == 127


def test_run_script_refuses_what_a_shell_cannot_carry() -> None:
    with pytest.raises(ValueError, match="empty"):
        lane.run_script([], "/", {})
    with pytest.raises(ValueError, match="A-B"):
        lane.run_script(["true"], "/", {"A-B": "x"})


def test_lane_env_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/host/bin")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = lane.lane_env({"FOO": "1", "PATH": "/mine"}, "/out")
    assert env["PATH"] == "/mine"
    assert env["HOME"] == "/root"
    assert env["MICROVM_LANE"] == "1" and env["MICROVM_LANE_OUT"] == "/out"
    assert env["FOO"] == "1"
    assert "SECRET_TOKEN" not in env  # only a short list of host variables is carried
    assert env["TERM"] == "dumb"
    monkeypatch.setenv("TERM", "xterm")
    assert lane.lane_env(None, "/out", tty=True)["TERM"] == "xterm"
    assert lane.lane_env({"TERM": "vt100"}, "/out")["TERM"] == "vt100"


def test_qemu_command_line() -> None:
    cmd = lane.qemu_command(Path("/k/vmlinux"), Path("/k/initrd"), Path("/c"), Path("/o"), smp=2, mem_mib=1024)
    joined = shlex.join(cmd)
    assert cmd[0] == lane.QEMU
    assert "-accel tcg,thread=multi" in joined and "-smp 2" in joined and "-m 1024" in joined
    assert "-cpu max,+svm" in joined and "-M q35" in joined and "-no-reboot" in joined
    assert "-kernel /k/vmlinux" in joined and "-initrd /k/initrd" in joined
    append = cmd[cmd.index("-append") + 1]
    assert "console=ttyS0" in append and "panic=-1" in append and "quiet" in append
    shares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-virtfs"]
    assert shares[0].startswith("local,path=/,mount_tag=host,") and "readonly=on" in shares[0]
    assert "mount_tag=ctl" in shares[1] and "readonly" not in shares[1]
    assert "path=/o,mount_tag=out" in shares[2]
    single = lane.qemu_command(Path("k"), Path("i"), Path("c"), Path("o"), smp=1, debug=True)
    assert single[single.index("-accel") + 1] == "tcg"
    assert "lane.debug" in single[single.index("-append") + 1]


def test_init_script_is_complete() -> None:
    init = lane.INIT_SCRIPT
    assert "@" not in init.replace("@MODULES@", "").replace("@NINEP@", "").replace(
        "@START@", "").replace("@END@", "")
    assert "reboot -f" in init and "/ctl/status" in init


def test_missing_qemu_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = lane.shutil.which
    monkeypatch.setattr(lane.shutil, "which", lambda name: None if name == lane.QEMU else real_which(name))
    reason = lane.lane_available()
    assert reason is not None and lane.QEMU in reason
    with pytest.raises(lane.LaneError, match="unavailable"):
        lane.run_in_lane(["true"])
    assert issubclass(lane.LaneError, MicroVMError)


def test_console_keeps_only_the_command_output(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = io.StringIO()
    monkeypatch.setattr(sys, "stdout", shown)
    console = lane._Console(stream=True)
    stream = (b"[    0.1] boot noise\r\n" + lane.START_MARK.encode() + b"\r\n"
              + b"hello\r\n\r\nw\xc3\xb6rld\r\n" + b"\r\n" + lane.END_MARK.encode() + b"\r\n"
              + b"[    5.0] reboot: Restarting system\r\n")
    for i in range(0, len(stream), 7):  # markers and UTF-8 split across reads
        console.feed(stream[i:i + 7])
    console.feed(b"", final=True)
    assert "".join(console.output) == "hello\n\nwörld\n"
    assert shown.getvalue() == "hello\n\nwörld\n"
    assert "Restarting system" in console.tail() and "boot noise" in console.tail()


def test_console_output_without_final_newline() -> None:
    console = lane._Console(stream=False)
    console.feed(f"{lane.START_MARK}\npartial\n{lane.END_MARK}\n".encode(), final=True)
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
    assert lane.modinfo(tmp_path / "kernel/net/bridge.ko")["depends"] == "llc,stp"
    order = [p.name for p in lane.module_order(tmp_path, ["kvm-amd", "virtio", "bridge"])]
    assert order == ["kvm.ko", "kvm-amd.ko", "llc.ko", "stp.ko", "bridge.ko"]
    with pytest.raises(lane.LaneError, match="nosuch"):
        lane.module_order(tmp_path, ["nosuch"])


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
    assert lane.extract_vmlinux(tmp_path / "vmlinuz", tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf
    (tmp_path / "plain").write_bytes(b"not a kernel" * 100)
    assert not lane.extract_vmlinux(tmp_path / "plain", tmp_path / "nothing")


def test_kernel_package_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"depends": "linux-image-amd64\n  Depends: linux-image-6.1.0-50-amd64\n"}
    monkeypatch.setattr(lanekernel, "_run", lambda argv, cwd=None: answers.get(argv[1], ""))
    assert lane._wanted_packages() == ["linux-image-6.1.0-50-amd64", "linux-image-6.1.0-50-amd64-unsigned"]
    answers = {"depends": "", "search": ("linux-image-6.1.0-9-amd64 - Linux 6.1\n"
                                         "linux-image-6.1.0-47-amd64 - Linux 6.1\n")}
    assert lane._wanted_packages()[0] == "linux-image-6.1.0-47-amd64"
    answers = {}
    with pytest.raises(lane.LaneError, match="apt"):
        lane._wanted_packages()


def test_cached_kernel_is_used_without_apt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MICROVM_CACHE", str(tmp_path))
    for n in (9, 47):
        boot = tmp_path / "lane" / f"6.1.0-{n}-amd64" / "boot"
        boot.mkdir(parents=True)
        (boot / f"vmlinuz-6.1.0-{n}-amd64").write_bytes(b"k")

    def no_apt(argv: list[str], cwd: str | None = None) -> str:
        raise AssertionError("apt consulted")

    monkeypatch.setattr(lanekernel, "_run", no_apt)
    assert lane.find_kernel().release == "6.1.0-47-amd64"


def test_main_passes_options_and_status(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(argv: list[str], **kw: object) -> lane.LaneResult:
        seen.update(kw, argv=argv)
        return lane.LaneResult(7, "", 0.1)

    monkeypatch.setattr(lane, "run_in_lane", fake_run)
    assert lane.main(["--cwd", "/r", "--env", "A=b=c", "--", "cmd", "--", "-x"]) == 7
    assert seen["argv"] == ["cmd", "--", "-x"]
    assert seen["cwd"] == "/r" and seen["env"] == {"A": "b=c"}

    def timing_out(argv: list[str], **kw: object) -> lane.LaneResult:
        raise lane.LaneTimeout("slow")

    monkeypatch.setattr(lane, "run_in_lane", timing_out)
    assert lane.main(["true"]) == 124


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
