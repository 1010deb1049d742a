"""Fuzz the split virtqueue with random hostile rings (run by hand, not by pytest).

    python tests/fuzz/fuzz_virtqueue.py --iterations 100000 --seed 1

Each iteration builds a fresh hostile ring (tests/support/virtio_driver.py) and
drives a Queue over it with pop(), add_used() and needs_notification(),
sometimes rewriting the ring between pops as a racing guest would. The queue
must return only descriptors inside guest memory, raise nothing but
QueueError and write nothing but the used ring. Any other exception or broken
rule is counted and printed, and the exit status is 1.

Iteration i uses its own random.Random("seed:i"), so `--seed S --only I`
replays one failure.

By default (--queues both) every ring goes through both implementations, the
Python reference (queue.PyQueue) and the Cython queue (microvm._virtq), with
the same choices replayed for the second: any difference in the chains, the
notification answers, the errors or the guest memory they leave is a finding
(tests/support/virtio_driver.run_differential). --queues python|cython runs one.
Of every three rings, one also goes through the frame API (send_chains,
reserve and use_reserved: what virtio-net does) between its pops, and one
through serve_block_io (virtio-blk's reads and writes, on an image in a memfd).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from microvm.devices.virtio.queue import PyQueue
from tests.support.virtio_driver import (
    Divergence,
    InvariantError,
    Outcome,
    RandomPicker,
    hostile_ring,
    mutate_ring,
    run_differential,
    run_hostile,
)

MUTATE_RATE = 0.2  # share of rings the guest rewrites between pops
SHOW = 5  # failures printed in full


def kind(message: str) -> str:
    """A QueueError message with its numbers taken out, to count errors by kind."""
    return re.sub(r"0x[0-9a-fA-F]+|\d+", "N", message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, help="run just this iteration (to replay a failure)")
    parser.add_argument("--queues", choices=["both", "python", "cython"], default="both",
                        help="both (the default): each ring through both queues, compared")
    args = parser.parse_args(argv)
    from microvm._virtq import Queue as CQueue

    single = {"python": PyQueue, "cython": CQueue}.get(args.queues)

    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    configs: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    shown = 0
    start = time.monotonic()
    iterations = [args.only] if args.only is not None else range(args.iterations)
    for i in iterations:
        pick = RandomPicker(random.Random(f"{args.seed}:{i}"))
        counts["rings run"] += 1
        try:
            if single is None:
                result, mutate = run_differential(pick, (PyQueue, CQueue), mutate_rate=MUTATE_RATE,
                                                  frames=i % 3 == 1, block=i % 3 == 2)
                if not isinstance(result, Outcome):  # both raised the same: still a finding
                    raise InvariantError(f"both queues raised {result[0]}: {result[1]}")  # type: ignore[index]
                outcome = result
            else:
                ring = hostile_ring(pick)
                mutate = pick.boolean(MUTATE_RATE)
                outcome = run_hostile(ring, pick, mutate_ring if mutate else None, single,
                                      frames=i % 3 == 1, block=i % 3 == 2)
            counts["rings rewritten between pops"] += mutate
        except Exception as e:  # anything but QueueError (which run_hostile catches) is a finding
            label = ("difference between the queues" if isinstance(e, Divergence)
                     else "invariant broken" if isinstance(e, InvariantError) else f"{type(e).__name__}")
            failures[f"{label}: {kind(str(e))}"] += 1
            if shown < SHOW:
                shown += 1
                print(f"--- iteration {i} (--seed {args.seed} --only {i}): {label}", file=sys.stderr)
                traceback.print_exc()
            continue
        if outcome.config_error is not None:
            configs[kind(outcome.config_error)] += 1
            continue
        counts["rings activated"] += 1
        counts["chains returned"] += outcome.chains
        counts["descriptors returned"] += outcome.descriptors
        counts["zero-length descriptors outside memory"] += outcome.zero_len_outside
        if outcome.error is not None:
            errors[kind(outcome.error)] += 1
        else:
            counts["rings drained without error"] += 1
    elapsed = time.monotonic() - start

    print(f"queues: {args.queues}; seed {args.seed}, {counts['rings run']} rings in {elapsed:.1f} s "
          f"({counts['rings run'] / max(elapsed, 1e-9):.0f}/s)")
    for name in ("rings activated", "rings rewritten between pops", "rings drained without error",
                 "chains returned", "descriptors returned", "zero-length descriptors outside memory"):
        print(f"  {counts[name]:>9}  {name}")
    print(f"  {sum(configs.values()):>9}  configurations refused by activate():")
    for message, n in configs.most_common():
        print(f"  {n:>13}  {message}")
    print(f"  {sum(errors.values()):>9}  QueueErrors from the rings:")
    for message, n in errors.most_common():
        print(f"  {n:>13}  {message}")
    print(f"  {sum(failures.values()):>9}  other exceptions or broken invariants")
    for message, n in failures.most_common():
        print(f"  {n:>13}  {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
