"""Reproducible, cached build of the project's own minimal x86_64 guest kernel.

The source is Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz).
The configuration is `make tinyconfig` plus the fragment kernels/microvm-x86_64.config,
completed by `make olddefconfig`. Kconfig silently drops an option whose
dependencies are not met, so every assignment in the fragment is checked against the
final .config before compiling.

Artifacts are cached under <cache>/kernels/<key>/ where the key hashes everything that
changes the output: the fragment, the source package version, the compiler version
and BUILD_SCRIPT_VERSION. A keyed directory only ever appears by an atomic rename of
a complete one, so its presence means the build finished.

    python -m microvm.kernelbuild [--force] [-j N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from microvm.errors import MicroVMError

if TYPE_CHECKING:  # rich is imported only when a build actually runs
    from rich.progress import Progress, TaskID

# Bump whenever this module changes how the kernel is built, so old cache entries
# are no longer picked up.
BUILD_SCRIPT_VERSION = "1"

ARCH = "x86_64"
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
def _fragment_path() -> Path:
    # In a checkout the fragment is kernels/ at the top; an installed wheel
    # carries the same directory as the package microvm._kernels.
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "kernels", here / "_kernels"):
        if (candidate / "microvm-x86_64.config").is_file():
            return candidate / "microvm-x86_64.config"
    return here.parent / "kernels" / "microvm-x86_64.config"


FRAGMENT = _fragment_path()

# Executables the kernel build runs, and the Debian package that provides each.
# lz4 compresses the bzImage payload because the fragment selects KERNEL_LZ4.
REQUIRED_TOOLS = {
    "make": "make",
    "gcc": "gcc",
    "bc": "bc",
    "bison": "bison",
    "flex": "flex",
    "cpio": "cpio",
    "tar": "tar",
    "xz": "xz-utils",
    "lz4": "lz4",
}
# Host headers: objtool needs libelf; scripts/ tools include OpenSSL headers.
REQUIRED_HEADERS = {"gelf.h": "libelf-dev", "openssl/opensslv.h": "libssl-dev"}
INCLUDE_DIRS: tuple[Path, ...] = (Path("/usr/include"), Path("/usr/include/x86_64-linux-gnu"))

# Fixed build identity: these are the only host facts kbuild writes into the image
# (uname -v, /proc/version), so fixing them makes rebuilds bit-for-bit comparable.
REPRODUCIBLE_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "microvm",
    "KBUILD_BUILD_HOST": "microvm",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
}
# Variables that kbuild or make would pick up from the caller's environment and that
# would change the output or confuse the job server.
SCRUBBED_ENV = ("ARCH", "CROSS_COMPILE", "KCFLAGS", "KCPPFLAGS", "KAFLAGS", "KBUILD_OUTPUT",
                "KCONFIG_CONFIG", "LOCALVERSION", "O", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")

LOG_TAIL_LINES = 30


class KernelBuildError(MicroVMError):
    """The guest kernel could not be built; the message says what to do about it."""


@dataclass(frozen=True)
class KernelArtifacts:
    vmlinux: Path
    bzimage: Path
    config: Path
    key: str


def cache_dir() -> Path:
    """$MICROVM_CACHE if set, else ~/.cache/microvm."""
    env = os.environ.get("MICROVM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "microvm"


def kernels_dir() -> Path:
    return cache_dir() / "kernels"


def _artifacts_in(directory: Path, key: str) -> KernelArtifacts:
    return KernelArtifacts(vmlinux=directory / "vmlinux", bzimage=directory / "bzImage",
                           config=directory / "config", key=key)


def _is_complete(art: KernelArtifacts) -> bool:
    return all(p.is_file() and p.stat().st_size > 0 for p in (art.vmlinux, art.bzimage, art.config))


# --- Inputs of the key ------------------------------------------------------------

@functools.cache
def source_version() -> str:
    """The dpkg version of the installed linux-source-6.1 package."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed: apt-get install {SOURCE_PACKAGE}") \
            from exc
    if not out:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed: apt-get install {SOURCE_PACKAGE}")
    return out


@functools.cache
def compiler_version() -> str:
    """First line of `gcc --version` (names the Debian revision too); "" if no gcc."""
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.splitlines()[0] if out else ""


def build_key(fragment_text: str, source_version: str, *, compiler: str | None = None) -> str:
    """Short hex digest of everything that determines the built kernel."""
    if compiler is None:
        compiler = compiler_version()
    h = hashlib.sha256()
    # NUL-separated so that moving text between fields changes the digest.
    for part in (BUILD_SCRIPT_VERSION, ARCH, source_version, compiler, fragment_text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --- Requirements -----------------------------------------------------------------

def missing_packages() -> list[str]:
    """Debian packages to install before a build can run (empty if none)."""
    missing: list[str] = []
    if not SOURCE_TARBALL.is_file():
        missing.append(SOURCE_PACKAGE)
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None and package not in missing:
            missing.append(package)
    for header, package in REQUIRED_HEADERS.items():
        if not any((d / header).is_file() for d in INCLUDE_DIRS):
            missing.append(package)
    return missing


def check_requirements() -> None:
    missing = missing_packages()
    if missing:
        raise KernelBuildError(f"missing kernel build requirements: apt-get install {' '.join(missing)}")


# --- Configuration ----------------------------------------------------------------

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig assignments in a .config or fragment; `is not set` reads as "n"."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def merge_fragment(base_text: str, fragment_text: str) -> str:
    """The base .config with the fragment's symbols replaced by the fragment's lines.

    Same result as scripts/kconfig/merge_config.sh -m, without kconfig's
    "override: reassigning" warnings cluttering the log.
    """
    ours = set(parse_config(fragment_text))
    kept = [line for line in base_text.splitlines()
            if not (set(parse_config(line)) & ours)]
    return "\n".join(kept) + "\n" + fragment_text


def dropped_options(fragment_text: str, final_text: str) -> list[str]:
    """Fragment assignments that did not survive, as "CONFIG_X (wanted y, got n)".

    A symbol absent from the final .config had unmet dependencies: it counts as "n".
    """
    final = parse_config(final_text)
    return [f"{name} (wanted {want}, got {final.get(name, 'n')})"
            for name, want in parse_config(fragment_text).items()
            if final.get(name, "n") != want]


def verify_config(fragment_text: str, final_text: str) -> None:
    dropped = dropped_options(fragment_text, final_text)
    if dropped:
        raise KernelBuildError("kconfig did not honour the fragment: " + ", ".join(dropped))


# --- Running the build ------------------------------------------------------------

def _build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(REPRODUCIBLE_ENV)
    return env


class _Runner:
    """Runs build steps, teeing their output to the log and counting compiled objects."""

    def __init__(self, log: TextIO, progress: Progress | None) -> None:
        self._log = log
        self._progress = progress
        self._task: TaskID | None = None
        self.objects = 0
        if progress is not None:
            self._task = progress.add_task("starting", objects=0)

    def stage(self, description: str) -> None:
        self._log.write(f"### {description}\n")
        self._log.flush()
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=description)
            # Without a terminal rich draws nothing until the end; a line per stage
            # keeps CI logs and pipes informative.
            if not self._progress.console.is_terminal:
                self._progress.console.print(description)

    def run(self, argv: Sequence[str], *, cwd: Path, env: dict[str, str]) -> None:
        self._log.write(f"$ {' '.join(argv)}\n")
        self._log.flush()
        tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                self._log.write(line)
                tail.append(line.rstrip("\n"))
                # kbuild's quiet output names each compiled C file as "  CC      path.o".
                if line.lstrip().startswith("CC "):
                    self.objects += 1
                    if self._progress is not None and self._task is not None:
                        self._progress.update(self._task, objects=self.objects)
        self._log.flush()
        if proc.returncode != 0:
            raise KernelBuildError(
                f"`{' '.join(argv)}` failed with exit status {proc.returncode}; "
                f"full log in {self._log.name}, last lines:\n" + "\n".join(tail))


@contextlib.contextmanager
def _progress_display(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"),
               TextColumn("{task.fields[objects]} objects compiled"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield progress


def _compile(src: Path, fragment_text: str, jobs: int, runner: _Runner) -> None:
    """Configure and build in the extracted tree `src`."""
    env = _build_env()
    make = ["make", f"ARCH={ARCH}"]
    runner.stage("make tinyconfig + fragment")
    runner.run([*make, "tinyconfig"], cwd=src, env=env)
    config = src / ".config"
    config.write_text(merge_fragment(config.read_text(), fragment_text))
    runner.run([*make, "olddefconfig"], cwd=src, env=env)
    verify_config(fragment_text, config.read_text())
    runner.stage(f"make -j{jobs} vmlinux bzImage")
    runner.run([*make, f"-j{jobs}", "vmlinux", "bzImage"], cwd=src, env=env)


def _install(src: Path, work: Path, log_path: Path, dest: Path, key: str) -> KernelArtifacts:
    """Copy the outputs into a staging dir beside `dest`, then rename it into place."""
    staging = work / "out"
    staging.mkdir()
    shutil.copy2(src / "vmlinux", staging / "vmlinux")
    shutil.copy2(src / "arch" / "x86" / "boot" / "bzImage", staging / "bzImage")
    shutil.copy2(src / ".config", staging / "config")
    shutil.copy2(log_path, staging / "build.log")
    if dest.exists():
        # Only reached with force=True (or a concurrent build of the same key): move
        # the old entry into the work dir, which is deleted with the build tree.
        dest.rename(work / "old")
    staging.rename(dest)
    return _artifacts_in(dest, key)


DPKG_STATUS = Path("/var/lib/dpkg/status")


def _key_fingerprint(fragment_text: str) -> str:
    """Cheap stand-in for the key's inputs: the fragment, and the identity of
    the dpkg database and gcc (any package change, the source's included,
    rewrites the database)."""
    parts = [BUILD_SCRIPT_VERSION, fragment_text]
    for path in (DPKG_STATUS, Path(shutil.which("gcc") or "/nonexistent")):
        try:
            st = path.resolve().stat()
            parts.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:-")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def find_default_kernel() -> KernelArtifacts | None:
    """The cached kernel for the current fragment and source package, if complete.

    Computing the key asks dpkg and gcc (two processes); the answer is kept
    next to the kernels under a fingerprint of their inputs, so starting a VM
    does not pay for that each time.
    """
    memo = kernels_dir() / "default-key.json"
    try:
        fragment_text = FRAGMENT.read_text()
        fingerprint = _key_fingerprint(fragment_text)
        try:
            saved = json.loads(memo.read_text())
        except (OSError, ValueError):
            saved = {}
        key = saved.get("key") if saved.get("fingerprint") == fingerprint else None
        if not isinstance(key, str):
            key = build_key(fragment_text, source_version())
            _write_memo(memo, {"fingerprint": fingerprint, "key": key})
    except (OSError, KernelBuildError):
        return None
    art = _artifacts_in(kernels_dir() / key, key)
    return art if _is_complete(art) else None


def _write_memo(path: Path, data: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the slow path next time


def build_kernel(*, force: bool = False, jobs: int | None = None, progress: bool = True,
                 log: Path | None = None, fragment: Path | None = None) -> KernelArtifacts:
    """Build the guest kernel into the cache (or return the cached one) and return its paths."""
    check_requirements()
    fragment = fragment or FRAGMENT
    try:
        fragment_text = fragment.read_text()
    except OSError as exc:
        raise KernelBuildError(f"cannot read kernel config fragment {fragment}: {exc}") from exc
    key = build_key(fragment_text, source_version())
    dest = kernels_dir() / key
    cached = _artifacts_in(dest, key)
    if not force and _is_complete(cached):
        return cached

    jobs = jobs or os.cpu_count() or 1
    kernels_dir().mkdir(parents=True, exist_ok=True)
    # The log lives outside the build tree so that it survives a failed build; it is
    # line-buffered so that `tail -f` follows the build.
    log_path = log or kernels_dir() / "build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The work dir sits in the cache, on the same filesystem as `dest`, so the final
    # rename is atomic; it is deleted (with the 1.5 GB tree) whatever happens.
    with tempfile.TemporaryDirectory(prefix=f".build-{key}-", dir=kernels_dir()) as tmp, \
            open(log_path, "w", buffering=1) as logf, _progress_display(progress) as display:
        work = Path(tmp)
        src = work / "linux"
        src.mkdir()
        runner = _Runner(logf, display)
        runner.stage(f"extracting {SOURCE_TARBALL.name}")
        runner.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(src), "--strip-components=1"],
                   cwd=work, env=_build_env())
        _compile(src, fragment_text, jobs, runner)
        runner.stage("installing into the cache")
        logf.flush()
        return _install(src, work, log_path, dest, key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microvm.kernelbuild",
                                     description="Build the microvm guest kernel into the cache.")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached kernel exists")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel make jobs (default: CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        art = build_kernel(force=args.force, jobs=args.jobs, progress=not args.quiet)
    except KernelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"key      {art.key}")
    print(f"vmlinux  {art.vmlinux} ({art.vmlinux.stat().st_size} bytes)")
    print(f"bzImage  {art.bzimage} ({art.bzimage.stat().st_size} bytes)")
    print(f"config   {art.config}")
    print(f"elapsed  {time.monotonic() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
