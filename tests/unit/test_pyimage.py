"""`microvm image python`: the host's Python and a venv as a root image.

The image is read back with debugfs (e2fsprogs): no mount, no root, no VM.
The venv these tests build from (msgpack, tblib, cloudpickle) is made once and
kept in the microvm cache, keyed by this Python and the list; the images go to
a cache of the test's own.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from microvm.cli import main
from microvm.errors import ConfigError
from microvm.images import ImageError
from microvm.initramfs import busybox_path
from microvm.pyimage import APPLETS, PythonImage, image_key, python_image
from tests.support import pyenv

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="session")
def test_venv() -> Path:
    return pyenv.test_venv()


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROVM_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def built(test_venv: Path, image_cache: Path) -> tuple[PythonImage, float]:
    start = time.monotonic()
    image = python_image(venv=test_venv)
    return image, time.monotonic() - start


# --- reading the image ---------------------------------------------------------------------------

def _debugfs(image: Path, request: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True)


def _stat(image: Path, path: str) -> tuple[str, int, str | None] | None:
    """(type, size, link target) of path in the image (links on the way followed, not the last), or None."""
    proc = _debugfs(image, f'stat "{path}"')
    if "File not found" in proc.stderr:
        return None
    kind = re.search(r"Type: (\w+)", proc.stdout)
    size = re.search(r"\bSize: (\d+)", proc.stdout)
    assert kind and size, proc.stdout + proc.stderr
    target = None
    if kind[1] == "symlink":
        fast = re.search(r'Fast link dest: "(.*)"', proc.stdout)
        target = fast[1] if fast else _debugfs(image, f'cat "{path}"').stdout  # a long target is in a block
    return kind[1], int(size[1]), target


def _resolve(image: Path, path: str) -> tuple[str, tuple[str, int, str | None] | None]:
    """Follow the last component's links too: (the path reached, its stat)."""
    for _ in range(40):
        st = _stat(image, path)
        if st is None or st[0] != "symlink":
            return path, st
        assert st[2] is not None
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), st[2]))
    raise AssertionError(f"link loop at {path}")


def _is_file_like_host(image: Path, path: str) -> bool:
    """path resolves in the image to a regular file as big as the host's."""
    _, st = _resolve(image, path)
    return st is not None and st[0] == "regular" and st[1] == os.stat(path).st_size


def _host_libraries(elf: str) -> list[str]:
    out = subprocess.run(["ldd", elf], capture_output=True, text=True, check=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


# --- contents --------------------------------------------------------------------------------------

def test_image_holds_the_interpreter_and_the_libraries_it_needs(built: tuple[PythonImage, float]) -> None:
    image, _ = built
    interpreter = os.path.realpath(image.python)
    assert _is_file_like_host(image.path, image.python)
    assert _is_file_like_host(image.path, interpreter)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libpython = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
        assert _is_file_like_host(image.path, libpython)
    import _ssl  # needs libssl and libcrypto, beyond libc

    libs = _host_libraries(_ssl.__file__)
    assert any("libssl" in lib for lib in libs), libs
    for lib in [*libs, *_host_libraries(interpreter)]:  # the dynamic loader among them
        assert _is_file_like_host(image.path, lib), lib
    assert _stat(image.path, "/etc/ld.so.cache") is not None


def test_image_holds_the_venv_and_the_stdlib_without_its_tests(built: tuple[PythonImage, float],
                                                               test_venv: Path) -> None:
    image, _ = built
    site = test_venv / "lib" / PY / "site-packages"
    assert _is_file_like_host(image.path, str(test_venv / "pyvenv.cfg"))
    assert _is_file_like_host(image.path, str(site / "msgpack" / "__init__.py"))
    stdlib = sysconfig.get_paths()["stdlib"]
    assert _is_file_like_host(image.path, f"{stdlib}/json/__init__.py")
    pycache = Path(stdlib, "json", "__pycache__")
    if (pycache / f"__init__.{sys.implementation.cache_tag}.pyc").exists():
        assert _stat(image.path, f"{pycache}/__init__.{sys.implementation.cache_tag}.pyc") is not None
        assert _stat(image.path, f"{pycache}/__init__.{sys.implementation.cache_tag}.opt-1.pyc") is None
    for gone in ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "site-packages"):
        assert _stat(image.path, f"{stdlib}/{gone}") is None, gone


def test_image_has_busybox_and_what_init_needs(built: tuple[PythonImage, float]) -> None:
    image, _ = built
    where, st = _resolve(image.path, "/bin/sh")
    assert st is not None and st[0] == "regular" and st[1] == busybox_path().stat().st_size
    assert where.endswith("/busybox")
    for applet in APPLETS:
        assert _stat(image.path, f"/bin/{applet}") == ("symlink", len("busybox"), "busybox"), applet
    for directory in ("/tmp", "/run", "/proc", "/sys", "/dev", "/root", "/etc"):
        assert _resolve(image.path, directory)[1] is not None, directory
    assert _debugfs(image.path, "cat /etc/passwd").stdout.startswith("root:x:0:0:")
    assert _debugfs(image.path, "cat /etc/group").stdout.startswith("root:x:0:")
    # A venv's: a script, since through a link Python would not find the venv.
    assert _debugfs(image.path, "cat /usr/local/bin/python3").stdout == f'#!/bin/sh\nexec {image.python} "$@"\n'


def test_manifest_lists_what_the_image_can_import(built: tuple[PythonImage, float], test_venv: Path) -> None:
    image, _ = built
    assert image.python == str(test_venv / "bin" / "python3")
    assert image.version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert {"json", "os", "sys", "_ssl", "msgpack", "tblib", "cloudpickle", "pip"} <= image.modules
    # On this host, not in the venv; and the stdlib's parts left out.
    import click
    import elftools

    for absent in (click, elftools):
        assert absent.__name__ not in image.modules
    assert not {"test", "idlelib", "tkinter", "turtle", "microvm", "__pycache__"} & image.modules
    names = [d.split("==")[0] for d in image.distributions]
    assert {"msgpack", "tblib", "cloudpickle"} <= set(names)
    assert names == sorted(names)
    assert PythonImage.load(image.path) == image
    assert PythonImage.load(image.manifest) == image


def test_a_second_call_comes_from_the_cache(built: tuple[PythonImage, float], test_venv: Path) -> None:
    image, build_seconds = built
    before = image.path.stat().st_mtime_ns
    start = time.monotonic()
    again = python_image(venv=test_venv)
    assert time.monotonic() - start < max(1.0, build_seconds / 2)
    assert again == image
    assert image.path.stat().st_mtime_ns == before
    assert image_key(venv=test_venv) == image.key


def test_a_broken_manifest_means_a_rebuild(built: tuple[PythonImage, float], test_venv: Path) -> None:
    image, _ = built
    image.manifest.write_text("{")
    again = python_image(venv=test_venv)
    assert again == image
    assert PythonImage.load(image.path) == image


def test_the_key_follows_the_distributions(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    key = image_key(venv=venv)
    assert image_key(venv=venv) == key
    dist = venv / "lib" / PY / "site-packages" / "foo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nVersion: 1.0\n\nA description.\n")
    (dist / "RECORD").write_text("")
    added = image_key(venv=venv)
    assert added != key
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: foo\nVersion: 1.1\n")
    assert image_key(venv=venv) not in (key, added)
    assert image_key(requirements=["msgpack"]) != image_key(requirements=["msgpack==1.0.8"])


# --- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        python_image(venv=tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"not a virtual environment \(no pyvenv.cfg\)"):
        python_image(venv=tmp_path)
    with pytest.raises(ConfigError, match="give it alone"):
        python_image(venv=tmp_path, python=sys.executable)
    with pytest.raises(ConfigError, match="no Python interpreter at"):
        python_image(python=tmp_path / "python3")
    with pytest.raises(ConfigError, match="not a Python interpreter"):
        python_image(python=shutil.which("true"))
    fake = tmp_path / "pypy3"
    fake.write_text('#!/bin/sh\ncat >/dev/null\necho \'{"implementation": "pypy", "version": "3.10.14"}\'\n')
    fake.chmod(0o755)
    with pytest.raises(ConfigError, match=r"pypy 3\.10\.14: only CPython"):
        python_image(python=fake)
    with pytest.raises(ConfigError, match="takes a list"):
        python_image(requirements="msgpack")
    with pytest.raises(ConfigError, match="is empty"):
        python_image(requirements=[])
    with pytest.raises(ConfigError, match="cannot read requirements file"):
        python_image(requirements=tmp_path / "requirements.txt")


def test_a_venv_the_guest_would_not_see_is_refused(tmp_path: Path, image_cache: Path) -> None:
    assert str(tmp_path).startswith("/tmp/")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(ConfigError, match="under /tmp, which the guest mounts over"):
        python_image(venv=venv)


def test_no_mkfs_fails_before_building(test_venv: Path, image_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name in ("mkfs.ext4", "mke2fs") else which(name))
    with pytest.raises(ImageError, match=r"mkfs\.ext4 not found"):
        python_image(venv=test_venv, force=True)


def test_pip_failing_names_the_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = pyenv.USER_CACHE / "test-venvs" / "cache"  # the requirements venv must not be under /tmp either
    monkeypatch.setenv("MICROVM_CACHE", str(cache))
    with pytest.raises(ImageError, match="No matching distribution found for no-such-distribution-x7q"):
        python_image(requirements=["--no-index", "no-such-distribution-x7q"])
    assert not list((cache / "images").glob("*.venv"))


# --- the command line ------------------------------------------------------------------------------

def test_cli_prints_the_image_path(built: tuple[PythonImage, float], test_venv: Path) -> None:
    image, _ = built
    r = CliRunner().invoke(main, ["image", "python", "--venv", str(test_venv)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{image.path}\n"
    assert "MiB" in r.stderr and image.python in r.stderr


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["image", "python", "--venv", str(tmp_path)])
    assert r.exit_code == 1
    assert r.stderr == f"microvm: error: {tmp_path} is not a virtual environment (no pyvenv.cfg)\n"
    r = CliRunner().invoke(main, ["image", "python", "-r", "req.txt", "--requirement", "msgpack"])
    assert r.exit_code == 2
    assert "not both" in r.stderr
