"""Checks of what a user hands to MicroVM: each bad value is a ConfigError naming the field.

Python would accept most of these and fail later, far from the cause (a
string as argv runs one letter per argument, 128.5 MiB fails deep in the
memory setup); checking them here keeps the error next to the mistake.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from microvm.errors import ConfigError

# What a VM may have: 16 MiB is below any Linux guest (the kernel actually
# loaded is checked against the memory at start); 254 vCPUs is what the
# MP table's 8-bit APIC IDs leave after the I/O APIC.
MIN_MEM_MIB = 16
MAX_MEM_MIB = 256 * 1024
MAX_VCPUS = 254

# A shell variable name (POSIX "Name"): our init exports env as shell variables.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def integer(field: str, value: Any, low: int, high: int) -> int:
    """An int (not a bool, not a float or a string that looks like one) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field} must be an integer, got {value!r} ({type(value).__name__})")
    if not low <= value <= high:
        raise ConfigError(f"{field} must be between {low} and {high}, got {value}")
    return value


def timeout(value: Any, field: str = "timeout") -> float | None:
    """None (wait for ever) or a finite number of seconds above zero."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field} must be finite and above 0 seconds (None waits for ever), got {value}")
    return float(value)


def text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{field} must be a string, got {value!r} ({type(value).__name__})")
    if "\0" in value:
        raise ConfigError(f"{field} contains a NUL character")
    return value


def argv(value: Any) -> list[str]:
    """A command as a list of strings: never a string (one letter per argument)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"the command must be a list of strings such as ['echo', 'hi'], got {value!r}")
    if not value:
        raise ConfigError("the command is empty; use start(None) for a shell")
    for i, arg in enumerate(value):
        text(f"argument {i} of the command", arg)
    return list(value)


def env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"env must be a mapping of names to strings, got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ConfigError(f"env name {key!r} is not a valid variable name (letters, digits, _; "
                              f"not starting with a digit)")
        out[key] = text(f"env[{key!r}]", val)
    return out


def path_list(field: str, value: Any) -> list[Any]:
    """A sequence of paths or specs, never one path (a string would become one item per letter)."""
    if isinstance(value, str | bytes | os.PathLike) or not isinstance(value, Sequence):
        raise ConfigError(f"{field} must be a list, got {value!r}")
    return list(value)


def kernel_arguments(field: str, value: str) -> str:
    """User text for the kernel command line that cannot hide what we add.

    The kernel reads its command line left to right; `--` hands everything
    after it to init, and an unclosed double quote swallows the rest of the
    line into one value (Documentation/admin-guide/kernel-parameters.rst).
    """
    text(field, value)
    if "--" in value.split():
        raise ConfigError(f"{field} contains '--', which would pass the arguments after it to init, "
                          f"not the kernel")
    if value.count('"') % 2:
        raise ConfigError(f"{field} has an unbalanced double quote: {value!r}")
    return value


IFNAMSIZ = 16  # include/uapi/linux/if.h, the terminating NUL included


def check_ifname(name: str) -> str:
    """A Linux interface name: 1-15 bytes, no '/', ':' or whitespace (dev_valid_name())."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise ConfigError(f"invalid interface name {name!r}: 1-15 characters, no '/', ':' or spaces")
    return name


def parse_mac(mac: str) -> bytes:
    """A unicast MAC address as six bytes."""
    parts = mac.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raw = b""
    if len(parts) != 6 or len(raw) != 6 or any(len(p) != 2 for p in parts):
        raise ConfigError(f"invalid MAC address {mac!r}: expected six hex pairs like 02:00:00:00:00:01")
    if raw[0] & 1:
        raise ConfigError(f"MAC address {mac} is a multicast address")
    return raw


SUN_PATH_MAX = 107  # struct sockaddr_un's sun_path (108 bytes) less its NUL


def unix_socket_path(field: str, value: Any) -> Path:
    """A path for a Unix socket we will create: short enough, in a directory that exists."""
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{field} must be a path, got {value!r}")
    path = Path(value)
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{field} path {str(path)!r} is longer than a Unix socket allows ({SUN_PATH_MAX} bytes)")
    if not path.parent.is_dir():
        raise ConfigError(f"{field}: directory {str(path.parent)!r} does not exist")
    return path


def guest_files(field: str, value: Any) -> dict[str, bytes]:
    """Relative paths (no '..', no leading '/') to file contents."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a mapping of relative paths to bytes, got {type(value).__name__}")
    out: dict[str, bytes] = {}
    for key, data in value.items():
        parts = key.split("/") if isinstance(key, str) else []
        if not parts or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in key:
            raise ConfigError(f"{field}: {key!r} is not a plain relative path")
        if not isinstance(data, bytes | bytearray):
            raise ConfigError(f"{field}[{key!r}] must be bytes, got {type(data).__name__}")
        out[key] = bytes(data)
    return out
