"""The bench/*.py entry points: each runs `microvm bench COMMAND` with its arguments.

Their old flags keep working: `--json FILE` becomes `--out` FILE's directory
(the command writes COMMAND.json there, and says so), and bench/boot.py keeps
its defaults and its --kernel names (LEGACY). Everything else goes to the
command as it is, which checks it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Legacy:
    """How a script's old command line maps onto its command's."""

    defaults: tuple[str, ...] = ()  # go first: the script's own arguments override them
    renames: Mapping[str, str] = field(default_factory=dict)  # old flag -> the command's
    values: Mapping[str, str] = field(default_factory=dict)  # a renamed flag's old value -> new


LEGACY = {
    # bench/boot.py compared start(), `microvm run` and QEMU, 20 boots each.
    "boot": Legacy(("--runs", "20", "--cli", "--qemu"), {"--kernel": "--kernel-format"},
                   {"vmlinux": "elf", "bzImage": "bzimage"}),
}


def translate(command: str, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command's arguments, notes for the user) for a script's argv."""
    legacy = LEGACY.get(command, Legacy())
    out, notes = list(legacy.defaults), []
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        mapped = flag in ("--json", *legacy.renames)
        if mapped and not eq:
            value = next(args, "")
        if not mapped or not value:
            out.append(arg)  # not ours, or a flag without its value: the command says what is wrong
        elif flag == "--json":
            out += ["--out", str(Path(value).parent)]
            notes.append(f"--json {value}: the results go to {Path(value).parent / command}.json (--out)")
        else:
            out += [legacy.renames[flag], legacy.values.get(value, value)]
    return out, notes


def run_script(command: str, argv: Sequence[str]) -> None:
    """`microvm bench COMMAND` with argv translated; exits with its status."""
    from microvm.cli import main

    args, notes = translate(command, argv)
    for note in notes:
        print(f"bench/{command}.py: {note}", file=sys.stderr)
    # The lane re-runs sys.argv[1:] (cli._in_lane): make it the command's.
    sys.argv = [sys.argv[0], "bench", command, *args]
    main(args=sys.argv[1:], prog_name="microvm")
