"""A/B device benchmarks: one guest script under microvm and under QEMU's microvm machine.

Both boot our kernel with the Debian root image (read-only) and run the same
sh script, which prints its measurements; runs take turns, microvm then QEMU,
so drifts in the host's load hit both. blk.py and net.py say what the script
does and which devices each side gets; report.compare() makes the table.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from microvm.benchmarks import guest, qemu, report
from microvm.benchmarks.guest import RunFailed
from microvm.errors import ConfigError, MicroVMError

Metrics = dict[str, float]


def kernel_and_image(package: str) -> tuple[Path, Path]:
    """Our default kernel (vmlinux) and the Debian root image with package; a
    ConfigError saying how to make whichever is missing. Asked on the host, before the lane."""
    from microvm.images import DEBIAN_PACKAGES, debian_image_path

    kernel = guest.kernel_path("elf")
    image = debian_image_path((*DEBIAN_PACKAGES, package))
    if not image.exists():
        raise ConfigError(f"no Debian image with {package}: run `microvm image debian --package {package}`")
    return kernel, image


def json_block(output: str, name: str) -> Any:
    """The JSON document the script printed after a line `==name==` (fio's,
    iperf3's: it ends with a `}` alone on its line)."""
    m = re.search(rf"=={re.escape(name)}==\s*(\{{.*?\n\}})", output, re.S)
    if not m:
        raise RunFailed(f"no output for {name}:\n{output[-2000:]}")
    return json.loads(m.group(1))


@dataclass(frozen=True)
class GuestScript:
    """The script and the machine it runs in, the same for both sides."""

    kernel: Path
    image: Path
    script: str
    mem_mib: int
    timeout: float

    def ours(self, **machine: Any) -> str:
        """The script's output under microvm; machine: MicroVM's device arguments (drives, nics, append)."""
        from microvm.machine import Drive, MicroVM

        vm = MicroVM(self.kernel, rootfs=Drive(self.image, read_only=True), mem_mib=self.mem_mib, **machine)
        r = vm.run(["sh", "-c", self.script], timeout=self.timeout)
        if r.exit_code != 0:
            raise RunFailed(f"the script failed in microvm ({r.exit_code}):\n{r.output[-2000:]}")
        return r.output

    def qemu(self, initrd: Path, *, root: str, devices: Sequence[str] = ()) -> str:
        """The script's output under QEMU (initrd: qemu.initramfs(script)); root:
        the kernel's root= for the image, which is the first virtio-blk device."""
        return qemu.run(self.kernel, initrd, mem_mib=self.mem_mib, cmdline=f"{qemu.CMDLINE} root={root}",
                        devices=[*qemu.root_drive(self.image), *devices], timeout=self.timeout).text()


@dataclass(frozen=True)
class Failure:
    side: str
    run: int
    seconds: float
    error: str


def alternate(sides: Mapping[str, Callable[[], Metrics]], runs: int, advance: Callable[[str], None]
              ) -> tuple[dict[str, list[Metrics]], list[Failure]]:
    """runs of each side, taking turns; side -> one record per run that
    succeeded, and the runs that failed (MicroVMError: reported, left out)."""
    records: dict[str, list[Metrics]] = {side: [] for side in sides}
    failures: list[Failure] = []
    for i in range(runs):
        for side, run in sides.items():
            t0 = time.monotonic()
            try:
                got = run()
            except MicroVMError as e:
                failures.append(Failure(side, i + 1, time.monotonic() - t0, str(e)))
                advance(f"{side} FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            records[side].append(got)
            advance(f"{side}: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items()))
    return records, failures


def compared(records: Mapping[str, Sequence[Metrics]], failures: Sequence[Failure], metrics: Sequence[str]
             ) -> dict[str, Any]:
    """alternate()'s outcome as report.compare()'s record (microvm / QEMU), with the failures."""
    samples = {side: {m: [rec[m] for rec in recs if m in rec] for m in metrics}
               for side, recs in records.items() if recs}
    if not samples:
        raise RunFailed(f"no run succeeded; the first failure: {failures[0].error if failures else '?'}")
    return {**report.compare(samples, metrics, [("microvm", "qemu")]), "failures": [asdict(f) for f in failures]}
