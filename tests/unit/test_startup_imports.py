"""`microvm run` starts fast: what it imports stays what a boot needs.

The CLI loads the bench and sandbox commands only when they are asked for,
the user's device modules come with the devices, and the loader reads ELF
with struct. A plain import that drags one of these back in is a start-up
regression (`microvm bench startup` measures the whole)."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from microvm.cli import main

HEAVY = ("asyncio", "rich", "elftools", "microvm.sandbox", "microvm.benchmarks", "microvm.devices.virtio.net",
         "microvm.devices.virtio.block", "microvm.devices.virtio.vsock", "microvm.backends.tap", "pyroute2")


def test_the_run_path_imports_nothing_heavy() -> None:
    code = ("import json, sys; import microvm.cli, microvm.machine, microvm.console; "
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert [m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY
            or m.startswith(tuple(f"{h}." for h in HEAVY))] == []  # a module, or one of a package's


def test_lazy_commands_are_listed_and_run() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name in ("bench", "call", "exec", "run", "doctor"):
        assert f"  {name} " in r.output
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "startup" in r.output
    assert CliRunner().invoke(main, ["exec", "--help"]).exit_code == 0
