"""RootTree: host paths land at the same paths in the tree, with the symlinks on the way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microvm.images import ImageError
from microvm.roottree import RootTree


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A usrmerged layout: lib -> usr/lib, and a library reached through two links."""
    h = tmp_path / "host"
    (h / "usr" / "lib" / "arch").mkdir(parents=True)
    (h / "usr" / "lib" / "arch" / "libx.so.1.2").write_bytes(b"\x7fELF-ish")
    os.symlink("libx.so.1.2", h / "usr" / "lib" / "arch" / "libx.so.1")
    os.symlink("usr/lib", h / "lib")
    (h / "lib64").mkdir()
    os.symlink(h / "lib" / "arch" / "libx.so.1", h / "lib64" / "ld.so")  # absolute
    os.symlink("../usr/./lib/arch/libx.so.1.2", h / "lib64" / "up")
    return h


def _tree(tmp_path: Path) -> RootTree:
    (tmp_path / "tree").mkdir()
    return RootTree(tmp_path / "tree")


def test_mirror_keeps_every_link_on_the_way(tmp_path: Path, host: Path) -> None:
    tree = _tree(tmp_path)
    real = tree.mirror(f"{host}/lib64/ld.so")
    assert str(real) == f"{host}/usr/lib/arch/libx.so.1.2"
    t = Path(f"{tree.root}{host}")
    assert os.readlink(t / "lib64" / "ld.so") == str(host / "lib" / "arch" / "libx.so.1")
    assert os.readlink(t / "lib") == "usr/lib"
    assert os.readlink(t / "usr" / "lib" / "arch" / "libx.so.1") == "libx.so.1.2"
    assert (t / "usr" / "lib" / "arch" / "libx.so.1.2").read_bytes() == b"\x7fELF-ish"
    assert tree.elf_files == [str(real)]
    assert str(tree.mirror(f"{host}/lib64/up")) == str(real)  # "..", "." and a copied file again


def test_copy_tree_skips_and_keeps_links(tmp_path: Path, host: Path) -> None:
    (host / "usr" / "lib" / "arch" / "skip.me").write_text("no")
    tree = _tree(tmp_path)
    tree.copy_tree(f"{host}/lib", skip=lambda p: p.endswith("skip.me"))
    t = Path(f"{tree.root}{host}")
    assert os.readlink(t / "usr" / "lib" / "arch" / "libx.so.1") == "libx.so.1.2"
    assert not (t / "usr" / "lib" / "arch" / "skip.me").exists()


def test_mirror_errors(tmp_path: Path, host: Path) -> None:
    tree = _tree(tmp_path)
    with pytest.raises(ImageError, match="does not exist on this host"):
        tree.mirror(f"{host}/nope/file")
    made = tree.mirror(f"{host}/lib/new/dir", make_dirs=True)
    assert str(made) == f"{host}/usr/lib/new/dir"
    assert Path(f"{tree.root}{made}").is_dir()
    os.symlink("loop", host / "loop")
    with pytest.raises(ImageError, match="too many levels of symlinks"):
        tree.mirror(f"{host}/loop")
    with pytest.raises(ImageError, match="is not a directory"):
        tree.mirror(f"{host}/usr/lib/arch/libx.so.1.2/x")


def test_our_files_never_replace_the_hosts(tmp_path: Path, host: Path) -> None:
    tree = _tree(tmp_path)
    tree.mirror(f"{host}/lib/arch/libx.so.1")
    tree.symlink(f"{host}/lib/arch", "libx.so.1", "elsewhere", keep_existing=True)
    assert os.readlink(f"{tree.root}{host}/usr/lib/arch/libx.so.1") == "libx.so.1.2"
    with pytest.raises(ImageError, match="already in the image"):
        tree.write_file(f"{host}/lib/arch", "libx.so.1.2", b"x")
