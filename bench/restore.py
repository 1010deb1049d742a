"""Snapshot, restore and fork of a tiny guest: `microvm bench restore` (microvm/benchmarks/restore.py).

    python bench/restore.py [--mem 128] [--runs 50] [--out DIR]

Runs where /dev/kvm is (a tiny CPL3 guest: PVM included, no lane); the
results are restore.json in --out.
"""

from _entry import run

if __name__ == "__main__":
    run("restore")
