"""Host-side backends of guest devices: raw disk images (disk.py, recording.py) and taps (tap.py).

A backend knows the host resource and nothing of virtio; the device in
microvm/devices/virtio/ speaks to the guest and calls its backend.

Backends opens a VM's disks and taps before the VM exists (a bad image, a
busy tap, a missing namespace is an error before anything starts) and
closes them after the VM's I/O threads are gone. Closing a tap microvm
created removes it (the kernel deletes a non-persistent tap with its last fd).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from microvm.errors import ConfigError
from microvm.specs import Drive, Nic

if TYPE_CHECKING:  # imported when a VM has disks or NICs: `microvm run` starts faster
    from microvm.backends.disk import RawDisk
    from microvm.backends.tap import Tap


class Backends:
    def __init__(self, drives: Sequence[Drive], nics: Sequence[Nic]):
        self.drives = list(drives)
        self.nic_specs = list(nics)
        self.disks: list[RawDisk] = []
        self.taps: list[Tap] = []

    def open(self) -> None:
        self.close()  # a second start() after a failed one begins afresh
        self._check_distinct()
        if self.drives:
            from microvm.backends.disk import RawDisk
        if self.nic_specs:
            from microvm.backends.tap import HostConfig, Tap
        try:
            for d in self.drives:
                if d.record is not None:
                    from microvm.backends.recording import RecordingDisk

                    self.disks.append(RecordingDisk(d.path, d.record, direct=d.direct))
                else:
                    self.disks.append(RawDisk(d.path, read_only=d.read_only, direct=d.direct))
            for n in self.nic_specs:
                self.taps.append(Tap(n.tap, HostConfig(address=n.host_interface, bridge=n.bridge, netns=n.netns)))
        except BaseException:
            self.close()
            raise

    def _check_distinct(self) -> None:
        """One image given twice is a mistake unless every use is read-only
        (two writers would corrupt it; the lock would call it "in use elsewhere")."""
        seen: dict[tuple[int, int], int] = {}
        for i, d in enumerate(self.drives):
            try:
                st = os.stat(d.path)
            except OSError:
                continue  # RawDisk names the problem
            key = (st.st_dev, st.st_ino)
            if key in seen:
                first = self.drives[seen[key]]
                if not (d.read_only and first.read_only):
                    raise ConfigError(f"disk image {d.path} is given twice (drives {seen[key]} and {i}); "
                                      f"only read-only drives may share an image")
            seen[key] = i
        # A recording log is truncated when it opens: never one another drive records to, never an image.
        logs = [os.path.abspath(d.record) for d in self.drives if d.record is not None]
        twice = {p for p in logs if logs.count(p) > 1}
        if twice:
            raise ConfigError(f"recording log {sorted(twice)[0]} is given to more than one drive")
        for log in logs:
            try:
                st = os.stat(log)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                raise ConfigError(f"recording log {log} is a drive's disk image")

    def close(self) -> None:
        for disk in self.disks:
            disk.close()
        for tap in self.taps:
            tap.close()
        self.disks, self.taps = [], []
