"""Shared by the benchmarks: on a PVM host, re-run this script in the lane
(the logic lives in microvm.benchmarks.lane, used by `microvm bench` too)."""

from __future__ import annotations

from microvm.benchmarks.lane import rerun_in_lane_if_pvm

__all__ = ["rerun_in_lane_if_pvm"]
