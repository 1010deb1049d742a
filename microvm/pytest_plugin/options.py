"""The plugin's settings: command line, then ini file, then environment, then default.

Read when a sandbox is first needed, never at start-up: a run that uses no
sandbox is not broken by a bad value it never asked for. A bad value is a
pytest.UsageError naming where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DEFAULT_MEM_MIB = 256
DEFAULT_MAX_UPLOAD_MIB = 64
# Keywords of @pytest.mark.microvm(...) and @pytest.mark.sandbox(...).
MARKER_KEYWORDS = ("mem_mib", "vcpus", "timeout")


@dataclass(frozen=True)
class Option:
    """One setting: its command-line flag (if any), ini name and environment variable."""

    dest: str
    flag: str | None
    ini: str
    env: str
    help: str
    metavar: str = "PATH"


OPTIONS = (
    Option("image", "--microvm-image", "microvm_image", "MICROVM_SANDBOX_IMAGE",
           "root image for sandboxes: a PythonImage manifest (.json) or its .ext4"),
    Option("venv", "--microvm-venv", "microvm_venv", "MICROVM_SANDBOX_VENV",
           "build (once, cached) the sandboxes' image from this virtual environment", "DIR"),
    Option("mem_mib", None, "microvm_mem_mib", "MICROVM_SANDBOX_MEM_MIB",
           f"guest memory of each sandbox in MiB (default {DEFAULT_MEM_MIB})"),
    Option("vcpus", None, "microvm_vcpus", "MICROVM_SANDBOX_VCPUS", "vCPUs of each sandbox (default 1)"),
    Option("timeout", None, "microvm_timeout", "MICROVM_SANDBOX_TIMEOUT",
           "seconds a sandbox's call or command, or a marked test's pytest run in its VM, may take "
           "(default: no limit)"),
    Option("max_upload_mib", None, "microvm_max_upload_mib", "MICROVM_SANDBOX_MAX_UPLOAD_MIB",
           f"most MiB of the rootdir shipped into a VM for a marked test (default {DEFAULT_MAX_UPLOAD_MIB})"),
)


@dataclass(frozen=True)
class Settings:
    image: Path | None
    venv: Path | None
    mem_mib: int
    vcpus: int
    timeout: float | None
    max_upload: int  # bytes
    exclude: tuple[str, ...]  # glob patterns, rootdir-relative, of what does not cross


@dataclass(frozen=True)
class VMConfig:
    """What one sandbox is given: from a marker's keywords, else the settings."""

    mem_mib: int
    vcpus: int
    timeout: float | None


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("microvm", "microvm sandboxes (micro-VMs over /dev/kvm)")
    for o in OPTIONS:
        if o.flag is not None:
            group.addoption(o.flag, dest=f"microvm_{o.dest}", default=None, metavar=o.metavar,
                            help=f"{o.help} (ini {o.ini}, env {o.env})")
        parser.addini(o.ini, f"{o.help} (env {o.env})", default=None)
    parser.addini("microvm_exclude", "glob patterns (rootdir-relative paths or names) of files and directories "
                  "that do not cross into the VM of a test marked microvm", type="linelist", default=[])
    group.addoption("--microvm-local", action="store_true", default=False,
                    help="run tests marked microvm in this process, as if unmarked (e.g. to debug with --pdb)")


@dataclass(frozen=True)
class Given:
    """A setting's value as given, where, and the directory a relative path is taken from."""

    value: str
    where: str  # "--microvm-venv", "ini option microvm_venv", "$MICROVM_SANDBOX_VENV"
    base: Path
    rank: int  # 0 command line, 1 ini file, 2 environment


def given(config: pytest.Config, o: Option, environ: Mapping[str, str]) -> Given | None:
    if o.flag is not None:
        value = config.getoption(f"microvm_{o.dest}")
        if value not in (None, ""):
            return Given(str(value), o.flag, config.invocation_params.dir, 0)
    value = config.getini(o.ini)
    if value not in (None, ""):
        base = config.inipath.parent if config.inipath is not None else config.rootpath
        return Given(str(value), f"ini option {o.ini}", base, 1)
    if environ.get(o.env):
        return Given(environ[o.env], f"${o.env}", Path.cwd(), 2)
    return None


def read_settings(config: pytest.Config, environ: Mapping[str, str] = os.environ) -> Settings:
    raw = {o.dest: given(config, o, environ) for o in OPTIONS}
    image, venv = raw["image"], raw["venv"]
    if image is not None and venv is not None:
        # The one given closer to this run wins: command line over ini file over environment.
        if image.rank == venv.rank:
            raise pytest.UsageError(f"microvm: {image.where} and {venv.where} both choose the sandboxes' "
                                    f"image: give one")
        raw["venv" if image.rank < venv.rank else "image"] = None

    def path(dest: str) -> Path | None:
        g = raw[dest]
        return None if g is None else g.base / Path(g.value).expanduser()

    return Settings(
        image=path("image"), venv=path("venv"),
        mem_mib=_number(raw["mem_mib"], int, DEFAULT_MEM_MIB, "mem_mib"),
        vcpus=_number(raw["vcpus"], int, 1, "vcpus"),
        timeout=_number(raw["timeout"], float, None, "timeout"),
        max_upload=int(_number(raw["max_upload_mib"], float, DEFAULT_MAX_UPLOAD_MIB, "max_upload_mib") * (1 << 20)),
        exclude=tuple(config.getini("microvm_exclude")),
    )


def _number(g: Given | None, kind: type, default: Any, field: str) -> Any:
    if g is None:
        return check_vm_field(field, default)
    try:
        value = kind(g.value)
    except ValueError:
        raise pytest.UsageError(f"microvm: {g.where} must be a number, got {g.value!r}") from None
    try:
        return check_vm_field(field, value)
    except ValueError as e:
        raise pytest.UsageError(f"microvm: {g.where}: {e}") from None


def check_vm_field(field: str, value: Any) -> Any:
    """value, checked as microvm checks it (a ConfigError, a ValueError, names the field)."""
    from microvm import checks

    if field == "mem_mib":
        return checks.integer(field, value, checks.MIN_MEM_MIB, checks.MAX_MEM_MIB)
    if field == "vcpus":
        return checks.integer(field, value, 1, checks.MAX_VCPUS)
    if field == "timeout":
        return checks.timeout(value)
    if value is not None and not value > 0:
        raise ValueError(f"{field} must be above 0, got {value}")
    return value


def vm_config(item: pytest.Item, marker: str, settings: Settings) -> VMConfig:
    """The sandbox's size for item: the marker's keywords (the closest marker's win), else the settings.
    A bad keyword or value is a ValueError naming it."""
    given: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(marker))):  # furthest first: the closest overrides
        if mark.args:
            raise ValueError(f"@pytest.mark.{marker} takes keywords only ({', '.join(MARKER_KEYWORDS)}), "
                             f"got {mark.args!r}")
        unknown = sorted(set(mark.kwargs) - set(MARKER_KEYWORDS))
        if unknown:
            raise ValueError(f"@pytest.mark.{marker} has no keyword {', '.join(unknown)} "
                             f"(it takes {', '.join(MARKER_KEYWORDS)})")
        given.update(mark.kwargs)
    checked = {field: check_vm_field(field, value) for field, value in given.items()}
    return VMConfig(mem_mib=checked.get("mem_mib", settings.mem_mib), vcpus=checked.get("vcpus", settings.vcpus),
                    timeout=checked.get("timeout", settings.timeout))
