"""A root image holding this host's own Python, for calling Python functions in a VM.

The host pickles a function and its arguments; the guest must unpickle them
with the same Python minor version and the same packages. So the image holds
the host's interpreter and an environment (the one running microvm, a given
venv, or a venv made from a requirements list), and nothing else but busybox.

Layout: every file sits at its host path (microvm/roottree.py), which keeps
what Python computes at start-up true in the guest without a line of
configuration: sys.prefix and the stdlib are found from the interpreter's own
path, its RUNPATH still names the directory of libpython, and a venv's
pyvenv.cfg `home` still names the base interpreter. Next to the interpreter:
libpython, the stdlib (without test/, idlelib/, tkinter/ and the other parts
no function calls, and without the base's site-packages unless that is the
environment), __pycache__ kept so imports need not compile on a read-only root
(but for the .opt-N.pyc of `python -O`),
the site-packages directories in use, every shared library an ELF file among
them needs (ldd) with the dynamic loader and ld.so.cache, busybox as /bin/sh
and its applets (our init runs the command with /bin/sh), the directories
init mounts on, /etc/passwd and /etc/group with root, and
/usr/local/bin/python3, first on init's PATH: a link to the interpreter, or for
a venv a script that starts the venv's (a link would lose the venv).

Left out: directories that .pth files add from outside the site directories
(editable installs: the host pickles such code by value, since it is not in
`modules`), libraries loaded with dlopen by name, and the host's /etc beyond
the loader's cache.

Images are cached by a key over the interpreter binary and the distributions
installed (or the requirement text, for a requirements venv); a JSON manifest
next to the image holds its PythonImage, so a cached image costs no rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import ConfigError
from microvm.images import ImageError, build_ext4, image_cache_dir, mkfs_ext4
from microvm.roottree import RootTree

FORMAT_VERSION = 1
# Parts of the stdlib no function sent to a VM uses: the test suite (most of
# the stdlib's size), the GUI and its demos, and the installers of pip and 2to3.
STDLIB_LEFT_OUT = frozenset({"test", "idlelib", "tkinter", "turtledemo", "turtle.py", "ensurepip", "lib2to3"})
APPLETS = ("sh", "ls", "cat", "echo", "true", "false", "sleep", "mkdir", "rm", "tar", "env", "kill", "ps", "id",
           "uname", "sha256sum", "head", "wc")
# Our init mounts its own filesystems on these in the root (guestinit.py's
# INIT_SCRIPT, "for fs in proc sys dev run tmp"): what the image has there is hidden.
GUEST_MOUNTS = ("/proc", "/sys", "/dev", "/run", "/tmp")

# What the image's own interpreter says about itself: run, not guessed, since
# a venv's interpreter may not be the one running microvm.
_PROBE = """
import importlib.machinery, json, os, platform, site, sys, sysconfig
paths = sysconfig.get_paths()
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": platform.python_version(),
    "executable": sys.executable,
    "real": os.path.realpath(sys.executable),
    "prefix": sys.prefix,
    "base_prefix": sys.base_prefix,
    "stdlib": [paths["stdlib"], paths["platstdlib"]],
    "path": sys.path,
    "site": site.getsitepackages(),
    "builtins": sorted(sys.builtin_module_names),
    "suffixes": importlib.machinery.EXTENSION_SUFFIXES,
}))
"""


@dataclass(frozen=True)
class PythonImage:
    """A cached ext4 root image with a Python in it, as its manifest describes it."""

    path: Path  # the .ext4 image
    python: str  # the interpreter's absolute path in the image (a venv's bin/python3 for a venv)
    version: str  # "3.11"
    modules: frozenset[str]  # top-level importable names: stdlib, builtins, site-packages
    distributions: tuple[str, ...]  # sorted "name==version"
    key: str
    missing_libraries: tuple[str, ...] = ()  # "lib (needed by file)", missing on the host as well

    @property
    def manifest(self) -> Path:
        return self.path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PythonImage:
        """The image whose manifest (or .ext4 next to it) is at path."""
        manifest = Path(path).with_suffix(".json")
        try:
            data = json.loads(manifest.read_text())
            if data["format"] != FORMAT_VERSION:
                raise ValueError(f"format {data['format']}, not {FORMAT_VERSION}")
            return cls(path=manifest.with_name(data["image"]), python=data["python"], version=data["version"],
                       modules=frozenset(data["modules"]), distributions=tuple(data["distributions"]),
                       key=data["key"], missing_libraries=tuple(data["missing_libraries"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageError(f"cannot read the python image manifest {manifest}: {e}") from e

    def save(self) -> None:
        data = {"format": FORMAT_VERSION, "key": self.key, "image": self.path.name, "python": self.python,
                "version": self.version, "distributions": list(self.distributions),
                "modules": sorted(self.modules), "missing_libraries": list(self.missing_libraries)}
        tmp = self.manifest.with_name(f".{self.manifest.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(self.manifest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"cannot write {self.manifest}: {e.strerror or e}") from e


@dataclass(frozen=True)
class _Interpreter:
    executable: str  # as invoked: a venv's bin/python3 stays that
    real: str
    full_version: str  # "3.11.7"
    prefix: str
    base_prefix: str
    stdlib: tuple[str, ...]  # real paths
    site: tuple[str, ...]  # real paths of the site directories that exist
    path: tuple[str, ...]  # sys.path, real paths of the directories that exist
    builtins: tuple[str, ...]
    suffixes: tuple[str, ...]

    @property
    def version(self) -> str:
        return ".".join(self.full_version.split(".")[:2])


def python_image(*, venv: str | os.PathLike[str] | None = None,
                 requirements: Sequence[str] | os.PathLike[str] | None = None,
                 python: str | os.PathLike[str] | None = None, force: bool = False) -> PythonImage:
    """A root image (built once, then cached) with a Python and its environment.

    venv: a virtual environment, with its own interpreter. requirements: a list
    of requirement strings, or a requirements file: installed with pip into a
    fresh venv. python: the interpreter (default: the one running microvm),
    with its own environment, or the base of the requirements venv.
    """
    interp, key, pip_args = _source(venv, requirements, python)
    images = image_cache_dir()
    image = images / f"python-{key}.ext4"
    if not force and (cached := _cached(image)):
        return cached
    mkfs_ext4()  # before minutes of pip and copying, not after
    _check_visible([interp.executable, interp.real, *interp.stdlib, *interp.site])
    images.mkdir(parents=True, exist_ok=True)
    # One builder per key; a second waits and then finds the image built.
    with _locked(images / f"python-{key}.lock"):
        if not force and (cached := _cached(image)):
            return cached
        if pip_args is None:
            return _build(interp, image, key)
        venv_dir = images / f"python-{key}.venv"
        _check_visible([str(venv_dir)], "(set MICROVM_CACHE elsewhere)")
        shutil.rmtree(venv_dir, ignore_errors=True)  # a crashed build's
        try:
            _make_venv(interp, venv_dir, pip_args)
            return _build(_probe(_venv_python(venv_dir)), image, key)
        finally:
            shutil.rmtree(venv_dir, ignore_errors=True)


def image_key(*, venv: str | os.PathLike[str] | None = None,
              requirements: Sequence[str] | os.PathLike[str] | None = None,
              python: str | os.PathLike[str] | None = None) -> str:
    """The cache key python_image() would use for these arguments (nothing is built)."""
    return _source(venv, requirements, python)[1]


def _source(venv: str | os.PathLike[str] | None, requirements: Sequence[str] | os.PathLike[str] | None,
            python: str | os.PathLike[str] | None) -> tuple[_Interpreter, str, list[str] | None]:
    """(the interpreter, the key, pip install's arguments for a requirements venv)."""
    if venv is not None and (python is not None or requirements is not None):
        raise ConfigError("venv= brings its own interpreter and packages: give it alone")
    interp = _probe(_venv_python(Path(venv)) if venv is not None else Path(python or _running_python()))
    if requirements is None:
        return interp, _key(interp, [f"{n}=={v} {mtime}" for n, v, mtime in _distributions(interp.site)]), None
    # Keyed on the text: what pip resolves it to is known only once installed.
    req_text, pip_args = _requirements(requirements)
    return interp, _key(interp, ["requirements", req_text]), pip_args


def _check_visible(paths: Sequence[str], advice: str = "") -> None:
    for path in paths:
        for mount in GUEST_MOUNTS:
            if path == mount or path.startswith(mount + "/"):
                raise ConfigError(f"{path} is under {mount}, which the guest mounts over: "
                                  f"it would be hidden in the guest {advice}".rstrip())


def _running_python() -> str:
    if not sys.executable:
        raise ConfigError("this Python does not know its own executable (sys.executable is empty): give python=")
    return sys.executable


def _venv_python(venv: Path) -> Path:
    if not venv.is_dir():
        raise ConfigError(f"venv {venv} is not a directory")
    if not (venv / "pyvenv.cfg").is_file():
        raise ConfigError(f"{venv} is not a virtual environment (no pyvenv.cfg)")
    for name in ("python3", "python"):
        if (venv / "bin" / name).exists():
            return (venv / "bin" / name).absolute()
    raise ConfigError(f"virtual environment {venv} has no bin/python3")


def _probe(python: Path) -> _Interpreter:
    if not python.is_file():
        raise ConfigError(f"no Python interpreter at {python}")
    try:
        proc = subprocess.run([str(python), "-I", "-"], input=_PROBE, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise ValueError((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:200])
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            raise ValueError("it did not answer microvm's probe of its layout") from None
        impl, version = data["implementation"], data["version"]
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"{python} is not a Python interpreter microvm can use: {e}") from e
    if impl != "cpython":
        raise ConfigError(f"{python} is {impl} {version}: only CPython's layout is supported")

    def real_dirs(paths: list[str]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(os.path.realpath(p) for p in paths if p and os.path.isdir(p)))

    return _Interpreter(executable=data["executable"], real=data["real"], full_version=version,
                        prefix=data["prefix"], base_prefix=data["base_prefix"], stdlib=real_dirs(data["stdlib"]),
                        site=real_dirs(data["site"]), path=real_dirs(data["path"]),
                        builtins=tuple(data["builtins"]), suffixes=tuple(data["suffixes"]))


def _requirements(requirements: Sequence[str] | os.PathLike[str]) -> tuple[str, list[str]]:
    """(the text the key covers, pip install's arguments)."""
    if isinstance(requirements, os.PathLike):
        path = Path(requirements)
        try:
            return path.read_text(), ["-r", str(path.absolute())]
        except OSError as e:
            raise ConfigError(f"cannot read requirements file {path}: {e.strerror or e}") from e
    if isinstance(requirements, str | bytes):
        raise ConfigError("requirements= takes a list of requirements, or a Path to a requirements file")
    reqs = [r.strip() for r in requirements if r.strip()]
    if not reqs:
        raise ConfigError("requirements= is empty")
    return "\n".join(reqs), reqs


def _distributions(site_dirs: Sequence[str]) -> list[tuple[str, str, int]]:
    """(normalised name, version, mtime of RECORD or the metadata) of each distribution; the first on the path wins."""
    found: dict[str, tuple[str, str, int]] = {}
    for site in site_dirs:
        for entry in sorted(os.scandir(site), key=lambda e: e.name):
            if not entry.name.endswith((".dist-info", ".egg-info")):
                continue
            meta = Path(entry.path)
            if meta.is_dir():
                meta = meta / ("METADATA" if entry.name.endswith(".dist-info") else "PKG-INFO")
            try:
                head = meta.read_text(errors="replace").split("\n\n", 1)[0]
            except OSError:
                continue  # no metadata: not a distribution pip or importlib.metadata would see either
            fields = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
            if "Name" not in fields:
                continue
            record = Path(entry.path, "RECORD")
            mtime = (record if record.is_file() else meta).stat().st_mtime_ns
            name = re.sub(r"[-_.]+", "-", fields["Name"]).lower()  # PEP 503
            found.setdefault(name, (name, fields.get("Version", "?"), mtime))
    return sorted(found.values())


def _key(interp: _Interpreter, environment: list[str]) -> str:
    st = os.stat(interp.real)
    lines = [f"microvm python image {FORMAT_VERSION}", interp.real, interp.full_version,
             f"{st.st_size} {st.st_mtime_ns}", interp.executable, *interp.site, *environment]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _cached(image: Path) -> PythonImage | None:
    if not image.is_file():
        return None
    try:
        return PythonImage.load(image)
    except ImageError:
        return None  # half written or from another version: rebuild


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _make_venv(interp: _Interpreter, venv: Path, pip_args: list[str]) -> None:
    _run([interp.executable, "-m", "venv", str(venv)], "python -m venv")
    _run([str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--quiet",
          *pip_args], f"pip install {' '.join(pip_args)}")


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except OSError as e:
        raise ImageError(f"{what} failed: {e.strerror or e}") from e
    if proc.returncode != 0:
        lines = (proc.stderr + proc.stdout).strip().splitlines() or ["no output"]
        # pip names the problem in its last ERROR line ("No matching distribution found for ...").
        errors = [line for line in lines if line.startswith("ERROR:")]
        raise ImageError(f"{what} failed ({proc.returncode}): {(errors or lines)[-1]}")


def _build(interp: _Interpreter, image: Path, key: str) -> PythonImage:
    with tempfile.TemporaryDirectory(dir=image.parent, prefix=f".{image.stem}.") as tmp:
        tree = RootTree(Path(tmp))
        modules, missing = _fill(tree, interp)
        build_ext4(tmp, image, label="python")
    distributions = tuple(f"{n}=={v}" for n, v, _ in _distributions(interp.site))
    result = PythonImage(path=image, python=interp.executable, version=interp.version, modules=modules,
                         distributions=distributions, key=key, missing_libraries=tuple(missing))
    result.save()
    return result


def _fill(tree: RootTree, interp: _Interpreter) -> tuple[frozenset[str], list[str]]:
    """Put the interpreter and its environment in the tree: (top-level module names, missing libraries)."""
    stdlib = set(interp.stdlib)

    def left_out(path: str) -> bool:
        parent, name = os.path.split(path)
        if name.endswith((".opt-1.pyc", ".opt-2.pyc")):
            return True  # bytecode for `python -O`: a fifth of the image, unused without -O
        if parent in stdlib:
            # The base's site-packages is copied (below) only where it is in use.
            return (name in STDLIB_LEFT_OUT or name.startswith("config-")
                    or name in ("site-packages", "dist-packages"))
        # lib-dynload's _tkinter would bring Tcl/Tk and X11 for the tkinter left out.
        return os.path.basename(parent) == "lib-dynload" and name.startswith("_tkinter.")

    for directory in interp.stdlib:
        tree.copy_tree(directory, left_out)
    for directory in interp.site:
        tree.copy_tree(directory)
    tree.mirror(interp.executable)
    if interp.prefix != interp.base_prefix:
        tree.mirror(os.path.join(interp.prefix, "pyvenv.cfg"))
    for directory in (*GUEST_MOUNTS, "/root", "/etc"):
        tree.mirror(directory, make_dirs=True)
    # Where the host's loader found libraries outside its default directories.
    if os.path.isfile("/etc/ld.so.cache"):
        tree.mirror("/etc/ld.so.cache")
    missing = tree.add_shared_libraries()
    tree.add_busybox(APPLETS)
    tree.write_file("/etc", "passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.write_file("/etc", "group", b"root:x:0:\n")
    if interp.prefix == interp.base_prefix:
        tree.symlink("/usr/local/bin", "python3", interp.executable, keep_existing=True)
    elif interp.executable != "/usr/local/bin/python3":
        # Not a link: Python looks for pyvenv.cfg by the path it was started as,
        # so through a link elsewhere a venv's interpreter is the bare base one.
        script = f'#!/bin/sh\nexec {shlex.quote(interp.executable)} "$@"\n'
        tree.write_file("/usr/local/bin", "python3", script.encode(), 0o755)

    # sys.path entries inside what was copied (lib-dynload, a .pth's directory in site-packages).
    roots = [*interp.stdlib, *interp.site]
    search = [p for p in interp.path if any(p == r or p.startswith(r + "/") for r in roots)]
    return _module_names([*roots, *search], interp.suffixes, left_out) | frozenset(interp.builtins), missing


def _module_names(directories: Sequence[str], suffixes: Sequence[str],
                  left_out: Callable[[str], bool]) -> frozenset[str]:
    """Top-level names `import` finds in these directories: packages (namespace
    ones too), .py modules and extension modules."""
    names: set[str] = set()
    for directory in dict.fromkeys(directories):
        for entry in os.scandir(directory):
            if left_out(entry.path):
                continue
            name = entry.name
            if entry.is_dir():
                stem = name
            elif name.endswith(".py"):
                stem = name[:-3]
            else:
                stem = next((name[:-len(s)] for s in suffixes if name.endswith(s)), "")
            if stem.isidentifier() and stem != "__pycache__":
                names.add(stem)
    return frozenset(names)
