"""A sandbox's first call, cold or from a snapshot: `microvm bench restore --sandbox`.

In the lane (Linux guests), each round, taking turns, to the first call's
answer (a no-op call; restored and forked sandboxes first get their fresh
entropy and time, Session.refresh, and so does QEMU's, for parity):

    cold             Sandbox(...).start(): boot, agent ready, connect
    cold (forkable)  the same with RAM in a memfd (what fork needs; no
                     transparent huge pages for it on this kind of host)
    restore          Sandbox.restore(snapshot)
    restore+prefetch the same, faulting in first the pages a restore touched
                     (recorded once, snapshot.record_pages)
    fork             a paused template's fork(1): RAM shared copy-on-write
    qemu-restore     QEMU microvm, same kernel, image and agent, with
                     vhost-vsock, started with `-incoming` from the state its
                     own `migrate` to a file saved (QEMU's snapshot to a file)

and the host memory (RSS, PSS) of this process with 1, 10 and 50 forks,
each past its first call. Times in seconds in the samples, ms in the table.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from microvm.benchmarks import ab, report
from microvm.benchmarks.call import BOOT_TIMEOUT, REQUEST_TIMEOUT, QemuSide, noop, vhost_vsock
from microvm.errors import AgentError, MicroVMError

SIDES = ("cold", "cold (forkable)", "restore", "restore+prefetch", "fork", "qemu-restore")
METRIC = "first_call"
CLONE_COUNTS = (1, 10, 50)
MIB = 1 << 20
RESET_RETRIES = 5


class Qmp:
    """QEMU's machine protocol on a Unix socket: one command at a time."""

    def __init__(self, path: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise MicroVMError("QEMU closed its QMP socket")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise MicroVMError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class QemuRestore:
    """QEMU's own snapshot to a file and its restore, for the same guest as ours."""

    def __init__(self, kernel: Path, image: Any, mem_mib: int, workdir: Path):
        self.kernel, self.image, self.mem_mib, self.dir = kernel, image, mem_mib, workdir
        self.state = workdir / "qemu-state"
        self.initrd = QemuSide(kernel, image, mem_mib).make_initrd(workdir)

    def save(self) -> None:
        """Boot, answer a call, migrate to the state file (QEMU pauses the source), end."""
        qmp_path = str(self.dir / "qmp-save.sock")
        side = QemuSide(self.kernel, self.image, self.mem_mib, initrd=self.initrd,
                        extra=["-qmp", f"unix:{qmp_path},server=on,wait=off"])
        try:
            side.open().call(noop)
            qmp = Qmp(qmp_path)
            try:
                qmp.execute("migrate", uri=f"exec:cat > {self.state}")
                deadline = time.monotonic() + BOOT_TIMEOUT
                while (status := qmp.execute("query-migrate").get("status")) not in ("completed", "failed"):
                    if time.monotonic() > deadline:
                        raise MicroVMError(f"QEMU's migration to a file did not finish: {status}")
                    time.sleep(0.05)
                if status != "completed":
                    raise MicroVMError("QEMU's migration to a file failed")
            finally:
                qmp.close()
        finally:
            side.close()

    def first_call(self) -> float:
        """QEMU started with -incoming from the file, to its agent's first answer."""
        side = QemuSide(self.kernel, self.image, self.mem_mib, initrd=self.initrd, wait_ready=False,
                        extra=["-incoming", f"exec:cat {self.state}"])
        t0 = time.perf_counter()
        try:
            session = side.open()  # connected once a ping is answered (QemuSide.reconnect)
            for _ in range(RESET_RETRIES):
                try:
                    session.refresh()
                    session.call(noop)
                    break
                except AgentError:  # reset by the guest's late transport reset: again
                    session = side.reconnect(BOOT_TIMEOUT)
            else:
                raise MicroVMError(f"QEMU's restored guest reset {RESET_RETRIES} connections in a row")
            return time.perf_counter() - t0
        finally:
            side.close()


def _sandbox(kernel: Path, image: Any, mem_mib: int, **kw: Any) -> Any:
    from microvm.sandbox import Sandbox

    return Sandbox(image=image, kernel=kernel, mem_mib=mem_mib, timeout=REQUEST_TIMEOUT,
                   boot_timeout=BOOT_TIMEOUT, **kw)


def _first_call(make: Callable[[], Any], keep: list[Any] | None = None) -> float:
    t0 = time.perf_counter()
    sb = make()
    try:
        sb.call(noop)
        seconds = time.perf_counter() - t0
    except BaseException:
        sb.close()
        raise
    if keep is None:
        sb.close()
    else:
        keep.append(sb)
    return seconds


def clone_memory(template: Any, counts: Sequence[int]) -> list[dict[str, float]]:
    me = psutil.Process()
    rows = []
    for n in counts:
        base = me.memory_full_info()
        clones = template.fork(n, resume=False)
        try:
            for clone in clones:
                clone.call(noop)
            now = me.memory_full_info()
            rows.append({"clones": n, "rss_mib": (now.rss - base.rss) / MIB, "pss_mib": (now.pss - base.pss) / MIB,
                         "pss_per_clone_mib": (now.pss - base.pss) / MIB / n})
        finally:
            for clone in clones:
                clone.close()
    return rows


def steps(rounds: int, with_qemu: bool) -> int:
    return 2 + rounds * (len(SIDES) - (not with_qemu)) + 1


def run(kernel: Path, image: Any, *, rounds: int, mem_mib: int, with_qemu: bool,
        clone_counts: Sequence[int] = CLONE_COUNTS, advance: Callable[[str], None] = lambda _: None
        ) -> dict[str, Any]:
    from microvm.sandbox import Sandbox

    if with_qemu:
        vhost_vsock()
    work = Path(tempfile.mkdtemp(prefix="microvm-bench-restore-"))
    template = None
    try:
        template = _sandbox(kernel, image, mem_mib, forkable=True).start()
        template.call(noop)
        snap = work / "snap"
        t0 = time.perf_counter()
        template.snapshot(snap)
        snapshot_seconds = time.perf_counter() - t0
        template.vm.pause()  # the fork template from here on
        # One restore records the pages a restore and first call touch, for the prefetching side.
        first = Sandbox.restore(snap, timeout=REQUEST_TIMEOUT)
        first.call(noop)
        pages = first.record_pages(snap)
        first.close()
        advance(f"template up, snapshot in {snapshot_seconds:.2f} s, {pages} pages recorded")
        sides: dict[str, Callable[[], ab.Metrics]] = {
            "cold": lambda: {METRIC: _first_call(lambda: _sandbox(kernel, image, mem_mib).start())},
            "cold (forkable)": lambda: {METRIC: _first_call(
                lambda: _sandbox(kernel, image, mem_mib, forkable=True).start())},
            "restore": lambda: {METRIC: _first_call(lambda: Sandbox.restore(snap, timeout=REQUEST_TIMEOUT))},
            "restore+prefetch": lambda: {METRIC: _first_call(
                lambda: Sandbox.restore(snap, timeout=REQUEST_TIMEOUT, prefetch=True))},
            "fork": lambda: {METRIC: _first_call(lambda: template.fork(1, resume=False)[0])},
        }
        if with_qemu:
            q = QemuRestore(kernel, image, mem_mib, work)
            q.save()
            advance(f"QEMU state saved: {os.path.getsize(q.state) / MIB:.0f} MiB")
            sides["qemu-restore"] = lambda: {METRIC: q.first_call()}
        records, failures = ab.alternate(sides, rounds, advance)
        memory = clone_memory(template, clone_counts)
        advance("clones: " + ", ".join(f"{r['clones']}: PSS {r['pss_mib']:.0f} MiB" for r in memory))
    finally:
        if template is not None:
            template.close()
        shutil.rmtree(work, ignore_errors=True)
    samples = {side: [rec[METRIC] for rec in recs] for side, recs in records.items() if recs}
    stats = {side: report.summarize(v).to_dict() for side, v in samples.items()}
    median = {side: s["median"] for side, s in stats.items()}
    ratios = {}
    if "cold" in median:
        ratios.update({f"{side} / cold": median[side] / median["cold"] for side in median if side != "cold"})
    if "qemu-restore" in median:
        ratios.update({f"{side} / qemu-restore": median[side] / median["qemu-restore"]
                       for side in ("restore", "restore+prefetch", "fork") if side in median})
    return {"benchmark": "restore-sandbox", "kernel": str(kernel), "image": str(image.path), "mem_mib": mem_mib,
            "rounds": rounds, "snapshot_seconds": snapshot_seconds, "samples": samples, "stats": stats,
            "ratios": ratios, "clones": memory, "failures": [f.__dict__ for f in failures]}


def tables(result: dict[str, Any]) -> list[Any]:
    groups = {f"sandbox, {result['mem_mib']} MiB": {side: report.Stats(**s) for side, s in result["stats"].items()}}
    timing = report.stats_table("to the first call's answer", groups, metric_header="start")
    ratios = report.rows_table("ratios of medians", ["ratio", "value"], sorted(result["ratios"].items()))
    memory = report.rows_table("host memory of running forks (growth of this process)",
                               ["forks", "RSS MiB", "PSS MiB", "PSS per fork MiB"],
                               [(r["clones"], r["rss_mib"], r["pss_mib"], r["pss_per_clone_mib"])
                                for r in result["clones"]])
    return [timing, ratios, memory]

