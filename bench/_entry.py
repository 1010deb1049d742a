"""What every bench/*.py does: run `microvm bench COMMAND` of this checkout
(not of some other installed microvm) with the script's arguments, its old
flags mapped (microvm/benchmarks/scripts.py)."""

import sys
from pathlib import Path


def run(command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from microvm.benchmarks.scripts import run_script

    run_script(command, sys.argv[1:])
