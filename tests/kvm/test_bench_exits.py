"""`microvm bench exits` runs each of its loops over a real tiny guest, each
counting the guest's exits exactly (the C loop in this process included)."""

from __future__ import annotations

import io

from rich.console import Console

from microvm.benchmarks import exits


def test_every_exit_loop_runs_the_guest_to_its_halt() -> None:
    result = exits.run(exits=500, runs=2)
    assert result["runs"] == {variant: 2 for variant in exits.VARIANTS}
    for variant in exits.VARIANTS:
        assert all(ns > 0 for ns in result["samples"][variant][exits.METRIC]), variant
    assert set(result["ratio"]) == {"bus / raw-c-here", "noop / raw-c-here", "raw-py / raw-c-here",
                                    "mmio / noop", "fast / raw-c-here", "raw-c-here / raw-c"}
    # the paired overheads: each the median of run-by-run differences, and shown in the table
    for variant in exits.OVERHEAD_VARIANTS:
        o = result["overhead_ns"][variant]
        d = sorted(a - b for a, b in zip(result["samples"][variant][exits.METRIC],
                                         result["samples"]["raw-c-here"][exits.METRIC], strict=True))
        assert o["pairs"] == 2 and (o["min"], o["max"]) == (d[0], d[-1]) and o["median"] == (d[0] + d[1]) / 2
    text = _rendered(exits.table(result))
    assert "noop - raw-c-here" in text and "per pair of runs" in text


def _rendered(renderable: object) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_the_mmio_loop_counts_mmio_exits_through_the_page_table() -> None:
    counter = exits.Counter()
    assert exits.run_loop(41, counter, mmio=True) > 0  # asserts 41 exits, then the halt
    assert counter.n == 41 and counter.last == 0  # al is 0: each exit wrote it to the device


def test_the_in_process_c_loop_counts_what_the_guest_does(tmp_path) -> None:
    loop = exits.load_c(exits.build_c(tmp_path, library=True))
    assert exits.raw_c_here(loop, 37) > 0  # asserts 37 port-I/O exits, then the halt


def test_the_fast_loop_is_answered_in_c_and_never_reaches_the_device() -> None:
    device = exits.Acknowledged()
    device.isr.raise_bits(0xFF)
    assert exits.run_loop(29, device, mmio=True) > 0  # asserts 29 exits, all answered in C, then the halt
    assert device.isr.value == 0xFF  # eax is 0 in the guest: each acknowledgement cleared nothing
