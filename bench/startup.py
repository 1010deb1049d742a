"""VMM start-up, a tiny PVH guest, against QEMU: `microvm bench startup` (microvm/benchmarks/startup.py).

    python bench/startup.py [--runs 7] [--out DIR]

The flags are the command's (`--help`); results go to DIR/startup.json.
"""

from _entry import run

if __name__ == "__main__":
    run("startup")
