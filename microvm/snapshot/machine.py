"""A MicroVM's part of a snapshot: its configuration, its devices, its run.

The Vm's part (KVM state, guest RAM) is microvm.snapshot's. Here:

    config      kernel, memory, vCPUs, command line; each drive with its
                size and mtime (a writable disk must be unchanged at restore:
                the guest's page cache and the disk belong together), NICs,
                vsock. The kernel file too: a snapshot names the kernel it
                booted, and a changed file is refused like a changed disk.
    devices     [name, state] in the device manager's order, from each
                device's snapshot_state() (devices/state.py).
    run         what the MicroVM knew about its command: output so far,
                whether the command had started, where its output went.

Restore builds the same MicroVM (same devices, same order, same windows and
interrupt lines), maps the memory, applies the KVM state (interrupt
controllers before devices: a device's restore may raise its line), then
the device states, then starts the vCPUs. Nothing runs until every check
has passed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from microvm.devicemanager import DeviceManager
from microvm.errors import SnapshotError

KIND = "microvm"


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_file(saved: dict[str, Any], what: str) -> None:
    """SnapshotError unless the file is there with the size and mtime it had."""
    path = saved["path"]
    try:
        now = file_identity(path)
    except OSError as e:
        raise SnapshotError(f"the {what} {path} the snapshot uses is gone: {e.strerror}") from e
    if (now["size"], now["mtime_ns"]) != (saved["size"], saved["mtime_ns"]):
        raise SnapshotError(f"the {what} {path} changed since the snapshot (size {saved['size']} -> {now['size']}, "
                            f"mtime {saved['mtime_ns']} -> {now['mtime_ns']})")


def capture_devices(devices: DeviceManager) -> list[list[Any]]:
    out: list[list[Any]] = []
    for a in devices.devices:
        holder = a.transport if a.transport is not None else a.device
        state = holder.snapshot_state() if hasattr(holder, "snapshot_state") else None
        out.append([a.name, state])
    return out


def apply_devices(devices: DeviceManager, saved: Any) -> None:
    if not isinstance(saved, list):
        raise SnapshotError("the snapshot's device list is malformed")
    names = [a.name for a in devices.devices]
    got = [entry[0] if isinstance(entry, list) and entry else None for entry in saved]
    if got != names:
        raise SnapshotError(f"the snapshot's devices {got} are not this VM's {names}")
    for a, (_, state) in zip(devices.devices, saved, strict=True):
        holder = a.transport if a.transport is not None else a.device
        if state is None:
            continue
        restore = getattr(holder, "restore_state", None)
        if restore is None:
            raise SnapshotError(f"device {a.name} keeps no state, but the snapshot has one")
        restore(state)


def check_config(config: dict[str, Any]) -> None:
    """Files the snapshot depends on: the kernel, each drive (read-only ones
    by size; the device checks that too), before anything is opened."""
    try:
        check_file(config["kernel"], "kernel")
        for drive in config["drives"]:
            if drive["read_only"]:
                try:
                    size = os.stat(drive["path"]).st_size
                except OSError as e:
                    raise SnapshotError(f"the disk image {drive['path']} the snapshot uses is gone: "
                                        f"{e.strerror}") from e
                if size != drive["size"]:
                    raise SnapshotError(f"the read-only disk image {drive['path']} changed size since the "
                                        f"snapshot ({drive['size']} -> {size})")
            else:
                check_file(drive, "writable disk image")
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"the snapshot's machine configuration is malformed: {e!r}") from e
