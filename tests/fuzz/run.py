#!/usr/bin/env python3
"""Run one coverage-guided fuzz target (tests/fuzz/targets.py) under atheris.

    python tests/fuzz/run.py TARGET [CORPUS_DIR ...] [libFuzzer flags: -runs=N -max_total_time=S ...]
    python tests/fuzz/run.py --list
    python tests/fuzz/run.py --replay TARGET     # each corpus file once, no atheris needed

Without a directory the corpus is tests/fuzz/corpus/TARGET, where new inputs
that reach new code are kept (commit them). The first directory given gets
the new inputs, the others are only read: tests/unit/test_fuzz.py passes a
temporary copy first. microvm's modules are instrumented for coverage; a
crash (an exception the target does not expect) is written to
build/fuzz/crash-* and the exit status is non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run as a script from anywhere

MAX_LEN = 8192
TARGET_ENV = "MICROVM_FUZZ_TARGET"


def corpus_dir(target: str) -> Path:
    return HERE / "corpus" / target


def plant_seeds(target: str, where: Path) -> None:
    """The hand-made first inputs (seeds.py), into the corpus that grows, if missing."""
    from tests.fuzz.seeds import SEEDS

    where.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(SEEDS[target]() if target in SEEDS else []):
        path = where / f"seed-{i}"
        if not path.exists():
            path.write_bytes(data)


def main(argv: list[str]) -> int:
    logging.disable(logging.CRITICAL)  # the devices log a guest's mistakes; a fuzzer makes millions
    if argv[:1] == ["--list"]:
        from tests.fuzz.targets import TARGETS

        print("\n".join(TARGETS))
        return 0
    if argv[:1] == ["--replay"] and len(argv) == 2:
        from tests.fuzz.targets import TARGETS

        files = sorted(corpus_dir(argv[1]).glob("*"))
        for path in files:
            TARGETS[argv[1]](path.read_bytes())
        print(f"{argv[1]}: {len(files)} inputs replayed")
        return 0
    if argv and argv[0].startswith("-") and os.environ.get(TARGET_ENV):
        # libFuzzer re-running this program (-merge=1's inner runs): flags and dirs only.
        argv = [os.environ[TARGET_ENV], *argv]
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    import atheris

    with atheris.instrument_imports(include=["microvm"]):
        from tests.fuzz.targets import TARGETS
    target, rest = argv[0], argv[1:]
    if target not in TARGETS:
        print(f"no target {target!r}: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    dirs = [a for a in rest if not a.startswith("-")]
    flags = [a for a in rest if a.startswith("-")]
    if not dirs:
        dirs = [str(corpus_dir(target))]
    plant_seeds(target, Path(dirs[0]))
    if not any(f.startswith("-max_len=") for f in flags):
        flags.append(f"-max_len={MAX_LEN}")
    if not any(f.startswith("-artifact_prefix=") for f in flags):  # crash-*, timeout-*: out of the tree's root
        artifacts = HERE.parents[1] / "build" / "fuzz"
        artifacts.mkdir(parents=True, exist_ok=True)
        flags.append(f"-artifact_prefix={artifacts}/")
    os.environ[TARGET_ENV] = target  # for the runs libFuzzer starts itself
    atheris.Setup([sys.argv[0], *flags, *dirs], TARGETS[target])
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
