"""Sandbox call latency, microvm against QEMU's vhost-vsock: `microvm bench call` (microvm/benchmarks/call.py).

    python bench/call.py [--calls 200] [--warmup 10] [--rounds 5] [--mem 256] [--image IMG | --venv DIR]
                         [--no-qemu] [--out DIR]

The flags are the command's (`--help`); `--json FILE` means `--out` FILE's
directory, where the results are call.json.
"""

from _entry import run

if __name__ == "__main__":
    run("call")
