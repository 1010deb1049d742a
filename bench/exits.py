"""Cost of one port-I/O exit: `microvm bench exits` (microvm/benchmarks/exits.py).

    python bench/exits.py [--exits 20000] [--runs 7] [--out DIR]

The flags are the command's (`--help`); the old `--json FILE` still works and
means `--out` FILE's directory, where the results are exits.json.
"""

from _entry import run

if __name__ == "__main__":
    run("exits")
