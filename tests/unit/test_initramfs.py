"""microvm.initramfs: newc layout checked by hand and by the system `cpio`."""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm import initramfs
from microvm.initramfs import NEWC_HEADER_SIZE, Cpio

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")


def parse_newc(blob: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """A minimal independent reader, asserting the alignment rules as it goes."""
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
             "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    entries = []
    off = 0
    while True:
        assert off % 4 == 0
        assert blob[off:off + 6] == b"070701"
        fields = {n: int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_end = off + NEWC_HEADER_SIZE + fields["namesize"]
        name = blob[off + NEWC_HEADER_SIZE: name_end - 1].decode()
        assert blob[name_end - 1] == 0
        data_off = (name_end + 3) & ~3
        assert blob[name_end:data_off] == b"\0" * (data_off - name_end)
        data = blob[data_off: data_off + fields["filesize"]]
        off = (data_off + fields["filesize"] + 3) & ~3
        entries.append((name, fields, data))
        if name == "TRAILER!!!":
            assert off == len(blob)
            return entries


def extract(blob: bytes, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=blob,
                   cwd=dest, check=True)


def sample() -> Cpio:
    c = Cpio()
    c.add_dir("/etc", 0o750)
    c.add_file("/etc/hostname", b"lane\n")
    c.add_file("/usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    c.add_file("/empty", b"")
    c.add_symlink("/bin/sh", "/bin/busybox")
    c.add_char_device("/dev/console", 5, 1)
    return c


def test_header_layout_and_padding() -> None:
    entries = parse_newc(sample().to_bytes())
    names = [e[0] for e in entries]
    # Parents come before children; the implicit ones are created on demand.
    assert names == ["etc", "etc/hostname", "usr", "usr/bin", "usr/bin/tool", "empty",
                     "bin", "bin/sh", "dev", "dev/console", "TRAILER!!!"]
    by_name = {n: (f, d) for n, f, d in entries}
    assert by_name["etc"][0]["mode"] == stat.S_IFDIR | 0o750
    assert by_name["usr/bin/tool"][0]["mode"] == stat.S_IFREG | 0o755
    assert by_name["bin/sh"][1] == b"/bin/busybox"
    console = by_name["dev/console"][0]
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert stat.S_ISCHR(console["mode"])
    assert [f["ino"] for _, f, _ in entries[:-1]] == list(range(1, len(entries)))
    assert all(f["mtime"] == 0 and f["uid"] == 0 for _, f, _ in entries)


def test_header_is_110_bytes_and_name_padded() -> None:
    c = Cpio()
    c.add_file("ab", b"xyz")  # 110 + len("ab\0") = 113 -> padded to 116
    blob = c.to_bytes()
    assert blob[NEWC_HEADER_SIZE:NEWC_HEADER_SIZE + 3] == b"ab\0"
    assert blob[113:116] == b"\0\0\0"
    assert blob[116:119] == b"xyz"
    assert blob[119:120] == b"\0"
    assert blob[120:126] == b"070701"
    assert b"TRAILER!!!\0" in blob


def test_deterministic_and_gzip_round_trip() -> None:
    raw = sample().to_bytes()
    assert raw == sample().to_bytes()
    packed = sample().to_bytes(compress=True)
    assert packed == sample().to_bytes(compress=True)
    assert gzip.decompress(packed) == raw


def test_duplicate_path_refused() -> None:
    c = Cpio()
    c.add_file("/a/b", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        c.add_file("a/b", b"2")
    with pytest.raises(ValueError, match="not a directory"):
        c.add_file("/a/b/c", b"")
    c.add_dir("/a", 0o700)  # implicit directory may be made explicit once
    with pytest.raises(ValueError, match="duplicate"):
        c.add_dir("/a")
    with pytest.raises(ValueError, match="invalid"):
        c.add_file("/x/../y", b"")


@needs_cpio
def test_round_trip_with_system_cpio(tmp_path: Path) -> None:
    host = tmp_path / "script"
    host.write_bytes(b"payload")
    host.chmod(0o640)
    c = sample()
    c.add_file_from("/opt/script", host)
    extract(c.to_bytes(), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "etc/hostname").read_bytes() == b"lane\n"
    assert stat.S_IMODE((out / "etc").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "usr/bin/tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "opt/script").stat().st_mode) == 0o640
    assert (out / "opt/script").read_bytes() == b"payload"
    assert (out / "empty").read_bytes() == b""
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert (out / "usr/bin/tool").stat().st_mtime == 0  # -m keeps the archive's mtime


name_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))


@needs_cpio
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.lists(name_part, min_size=1, max_size=3).map("/".join),
                             st.binary(max_size=600), max_size=8))
def test_property_random_names_and_sizes(tmp_path_factory: pytest.TempPathFactory,
                                         files: dict[str, bytes]) -> None:
    c = Cpio()
    added: dict[str, bytes] = {}
    for path, data in files.items():
        try:
            c.add_file(path, data)
        except ValueError:
            continue  # a path clashing with an earlier file or directory
        added[path] = data
    blob = c.to_bytes()
    parse_newc(blob)
    out = tmp_path_factory.mktemp("rt") / "x"
    extract(blob, out)
    for path, data in added.items():
        assert (out / path).read_bytes() == data


def test_static_busybox_detection(tmp_path: Path) -> None:
    fake = tmp_path / "notelf"
    fake.write_bytes(b"#!/bin/sh\n")
    assert not initramfs.is_static_elf(fake)


def test_busybox_missing_names_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(initramfs, "BUSYBOX_CANDIDATES", (tmp_path / "busybox",))
    monkeypatch.setattr(initramfs.shutil, "which", lambda _: None)
    with pytest.raises(initramfs.CpioError, match="apt-get install busybox-static"):
        initramfs.busybox_path()


@pytest.mark.skipif(not any(p.is_file() for p in initramfs.BUSYBOX_CANDIDATES), reason="no busybox")
def test_add_busybox_applets() -> None:
    try:
        bb = initramfs.busybox_path()
    except initramfs.CpioError as e:
        pytest.skip(str(e))
    c = Cpio()
    initramfs.add_busybox(c, ["sh", "insmod", "mount"], busybox=bb)
    assert "bin/busybox" in c.paths()
    assert "bin/sh" in c and "bin/mount" in c
    assert any(p.endswith("/insmod") for p in c.paths())
    with pytest.raises(ValueError, match="no applet"):
        initramfs.add_busybox(c, ["no-such-applet"], busybox=bb)
