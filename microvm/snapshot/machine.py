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

MicroVMSnapshots holds the methods MicroVM has for them (pause, resume,
snapshot, restore, record_pages, fork): machine.py mixes it in.

Restore builds the same MicroVM (same devices, same order, same windows and
interrupt lines), maps the memory, applies the KVM state (interrupt
controllers before devices: a device's restore may raise its line), then
the device states, then starts the vCPUs. Nothing runs until every check
has passed.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from microvm import snapshot as snapshots
from microvm.arch.x86_64 import layout
from microvm.backends import Backends
from microvm.devicemanager import DeviceManager
from microvm.errors import ConfigError, MicroVMError, SnapshotError
from microvm.hostprocess import interrupts_deferred
from microvm.ratelimit import rate_limit_from
from microvm.seccomp import confiner
from microvm.specs import Drive, Nic
from microvm.vm import Vm

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
    # Only now, every state checked and taken: queues with work waiting are served.
    for a in devices.devices:
        serve = getattr(a.transport, "serve_restored", None)
        if serve is not None:
            serve()


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


def _check_layout(snap: snapshots.Snapshot, config: dict[str, Any]) -> None:
    """Guest RAM must be what the configuration's memory size lays out: the
    devices' windows and the guest's memory map assume it."""
    try:
        expected = [tuple(r) for r in layout.ram_ranges(int(config["mem_mib"]) * layout.MIB)]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's machine configuration is malformed: {e!r}") from e
    if [tuple(r) for r in snap.layout] != expected:
        raise SnapshotError(f"{snap.path}: guest RAM {snap.layout} is not the layout of "
                            f"mem_mib={config['mem_mib']} ({expected})")


RUN_CONSOLE_TAIL = 4000  # of the console, kept in a snapshot (the guest's output is all kept)
_fork_ids = itertools.count(1)  # vsock socket paths of clones


class MicroVMSnapshots:
    """MicroVM's snapshot methods: machine.py's MicroVM mixes this in, and is
    the only class that does (the attributes below are its own)."""

    vm: Vm | None
    devices: DeviceManager | None
    backends: Backends
    kernel: Path | None
    mem_mib: int
    vcpus: int
    cmdline: str
    append: str
    rootfs: bool
    drives: list[Drive]
    nics: list[Nic]
    vsock: str | Path | None
    vsock_cid: int
    force: bool
    seccomp: str | None
    stdout: bytearray
    console: bytearray
    _in_command: bool
    _command_on_console: bool
    _started: bool
    _t0: int
    _times: dict[str, int]
    _close_lock: threading.RLock

    def _require_vm(self) -> Vm:
        raise NotImplementedError

    def _wire_devices(self, vm: Vm) -> None:
        raise NotImplementedError

    def _prepare_host(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        """Stop the guest at an instruction boundary with its devices quiet
        (no request in flight); resume() goes on."""
        self._require_vm().pause()

    def resume(self) -> None:
        self._require_vm().resume()

    def snapshot(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None,
                 checksum: bool = True) -> snapshots.Snapshot:
        """Pause the guest and write a snapshot to the new directory `path`.
        The VM stays paused: resume() or close() it afterwards. Writable
        disks are synced first; they must not change before a restore.
        meta: the caller's own entries (plain data), kept as state["meta"].
        checksum: record a sha256 of guest RAM for restore(verify=True);
        False saves hashing all of RAM (the state file has its own always)."""
        with self._close_lock:  # no close() (the waiter's, a user's) under the snapshot
            vm = self._require_vm()
            vm.pause()
            for disk in self.backends.disks:
                if not disk.read_only:
                    disk.flush()
            extra = {"kind": KIND, "config": self._snapshot_config(),
                     "devices": capture_devices(self._require_devices()), "run": self._run_state(),
                     "meta": meta or {}}
            return snapshots.take(vm, path, extra, checksum=checksum)

    @classmethod
    def restore(cls, path: str | os.PathLike[str] | snapshots.Snapshot, *, vsock: str | Path | bool | None = True,
                nics: Sequence[Nic] | None = None, console: BinaryIO | Callable[[bytes], Any] | None = None,
                stdout: BinaryIO | Callable[[bytes], Any] | None = None, prefetch: bool = False,
                verify: bool = False, force: bool = False) -> Any:
        """A running MicroVM from a snapshot directory: the guest goes on
        where it was; wait() for its command as after start().

        vsock: True keeps the snapshot's socket path, or give another (the
        original may still hold it); connections are reset, and the guest
        hears so (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET). nics: other taps
        than the snapshot's, one per NIC. prefetch: fault in the pages the
        last restore touched (snapshot.record_pages). verify: check guest
        RAM against its checksum first. Every check (format, checksum,
        CPU features, kernel and disk files) passes before a vCPU runs.
        """
        snap = path if isinstance(path, snapshots.Snapshot) else snapshots.Snapshot.load(path)
        state = snap.state
        if state.get("kind") != KIND:
            raise SnapshotError(f"{path} is a snapshot of a bare VM, not of a MicroVM")
        try:
            config = state["config"]
            devices, run = state["devices"], state["run"]
        except KeyError as e:
            raise SnapshotError(f"{path}: the state has no {e.args[0]!r}") from e
        check_config(config)
        _check_layout(snap, config)
        m = cls._from_config(config, vsock=vsock, nics=nics, console=console, stdout=stdout, force=force)
        m._prepare_host()
        with interrupts_deferred():  # a Ctrl-C between the two would leave the VM to nobody
            vm = snap.restore_vm(verify=verify, prefetch=prefetch)
            m._adopt(vm, devices, run)  # closes vm if it fails
        return m

    def record_pages(self, path: str | os.PathLike[str]) -> int:
        """For a VM restored from the snapshot `path`: write down the guest pages it
        has touched so far, which restore(path, prefetch=True) faults in first
        from then on (as REAP does: record once, prefetch after). Pages written."""
        return snapshots.record_pages(self._require_vm(), path)

    def fork(self, n: int, *, vsock: Sequence[str | Path] | None = None,
             nics: Sequence[Sequence[Nic]] | None = None,
             stdout: Sequence[BinaryIO | Callable[[bytes], Any] | None] | None = None) -> list[Any]:
        """n running clones of this guest, sharing its RAM copy-on-write
        (forkable=True makes that free; otherwise the touched RAM is copied
        once). This VM is left paused: resume() it, or keep it as a template.

        Each clone needs its own host ends: a vsock socket path (default:
        this one's with a suffix) and taps (nics, one list per clone). A
        writable disk cannot be shared: a clone of a VM with one is refused.
        stdout: where each clone's command output goes (one per clone).
        """
        vm = self._require_vm()
        if n < 1:
            raise ConfigError(f"fork needs n >= 1, got {n}")
        writable = [str(d.path) for d in self.drives if not d.read_only]
        if writable:
            raise SnapshotError(f"clones would share the writable disk(s) {writable}: give the VM read-only "
                                f"drives (an overlay per clone is not supported)")
        if self.nics and (nics is None or len(nics) != n):
            raise SnapshotError(f"each clone needs its own taps: nics=[[Nic(...), ...], ...] with {n} lists")
        if vsock is not None and len(vsock) != n:
            raise ConfigError(f"vsock: {n} socket paths needed, got {len(vsock)}")
        if stdout is not None and len(stdout) != n:
            raise ConfigError(f"stdout: {n} sinks needed, got {len(stdout)}")
        with self._close_lock:  # no close() (the waiter's, a user's) under the fork
            vm = self._require_vm()
            vm.pause()
            config = self._snapshot_config()
            devices, run = capture_devices(self._require_devices()), self._run_state()
            vms = snapshots.fork(vm, n)
        clones: list[Any] = []
        try:
            for i, clone_vm in enumerate(vms):
                path: str | Path | bool = False
                if self.vsock is not None:
                    path = vsock[i] if vsock is not None else f"{self.vsock}.{os.getpid()}-{next(_fork_ids)}"
                clone = self._from_config(config, vsock=path, nics=nics[i] if nics is not None else None,
                                          console=None, stdout=stdout[i] if stdout is not None else None,
                                          force=self.force)
                clone._adopt(clone_vm, devices, run)  # closes clone_vm if it fails
                vms[i] = None  # type: ignore[call-overload]  # the clone owns it from here
                clones.append(clone)
        except BaseException:
            for c in clones:
                c.close()
            for rest in vms:
                if rest is not None:
                    rest.close()
            raise
        return clones

    @classmethod
    def _from_config(cls, config: dict[str, Any], *, vsock: str | Path | bool | None,
                     nics: Sequence[Nic] | None, console: Any, stdout: Any, force: bool) -> Any:
        try:
            saved_vsock = config["vsock"]
            path: str | Path | None = saved_vsock if vsock is True else vsock or None
            if saved_vsock is None:
                path = None
            make: Any = cls  # MicroVM: the class this mixes into
            m = make(config["kernel"]["path"], mem_mib=config["mem_mib"], vcpus=config["vcpus"],
                    cmdline=config["cmdline"], append=config["append"],
                    drives=[Drive(d["path"], read_only=d["read_only"], direct=d["direct"],
                                  rate_limit=rate_limit_from(d.get("rate_limit"))) for d in config["drives"]],
                    nics=nics if nics is not None else [
                        Nic(**{**spec, "rx_rate_limit": rate_limit_from(spec.get("rx_rate_limit")),
                               "tx_rate_limit": rate_limit_from(spec.get("tx_rate_limit"))})
                        for spec in config["nics"]],
                    vsock=path, vsock_cid=config["vsock_cid"], console=console, stdout=stdout, force=force,
                    seccomp=config.get("seccomp", "auto"))
            if len(m.nics) != len(config["nics"]):
                raise SnapshotError(f"the snapshot has {len(config['nics'])} NICs, {len(m.nics)} given")
            m.rootfs = bool(config["rootfs"])
        except (KeyError, TypeError, ConfigError) as e:
            raise SnapshotError(f"the snapshot's machine configuration is malformed: {e!r}") from e
        return m

    def _snapshot_config(self) -> dict[str, Any]:
        assert self.kernel is not None  # start() fills in the default
        return {"kernel": file_identity(self.kernel), "mem_mib": self.mem_mib, "vcpus": self.vcpus,
                "cmdline": self.cmdline, "append": self.append, "rootfs": self.rootfs,
                "drives": [{**file_identity(d.path), "read_only": d.read_only, "direct": d.direct,
                            "rate_limit": None if d.rate_limit is None else dataclasses.asdict(d.rate_limit)}
                           for d in self.drives],
                "nics": [dataclasses.asdict(n) for n in self.nics],
                "vsock": None if self.vsock is None else str(self.vsock), "vsock_cid": self.vsock_cid,
                "seccomp": self.seccomp}

    def _run_state(self) -> dict[str, Any]:
        return {"in_command": self._in_command, "command_on_console": self._command_on_console,
                "stdout": bytes(self.stdout), "console": bytes(self.console[-RUN_CONSOLE_TAIL:])}

    def _adopt(self, vm: Vm, devices: Any, run: Any) -> None:
        """Run `vm` (KVM state applied) as this MicroVM: wire the same devices,
        give them their saved states, start the vCPUs. Closes vm on failure."""
        self._started = True
        with self._close_lock, interrupts_deferred():
            self._t0 = time.monotonic_ns()
            try:
                self._prepare_host()
                self.backends.open()
            except BaseException:
                vm.close()
                raise
            self.vm = vm
            try:
                vm.confine_threads(confiner("vcpu", self.seccomp), confiner("io", self.seccomp))
                self._wire_devices(vm)
                apply_devices(self._require_devices(), devices)
                self._in_command = bool(run["in_command"])
                self._command_on_console = bool(run["command_on_console"])
                self.stdout += run["stdout"]
                self.console += run["console"]
                if self._in_command:
                    self._times["command started"] = self._t0
                vm.start()
            except (KeyError, TypeError) as e:
                self.close()
                raise SnapshotError(f"the snapshot's run state is malformed: {e!r}") from e
            except BaseException:
                self.close()
                raise

    def _require_devices(self) -> DeviceManager:
        if self.devices is None:
            raise MicroVMError("the VM is not running")
        return self.devices
