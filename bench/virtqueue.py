"""Cost of a virtqueue request, device side, Python queue vs Cython queue:
`microvm bench virtqueue` (microvm/benchmarks/virtqueue.py).

    python bench/virtqueue.py [--chains 100000] [--runs 7] [--out DIR]
"""

from _entry import run

if __name__ == "__main__":
    run("virtqueue")
