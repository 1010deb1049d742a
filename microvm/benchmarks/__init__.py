"""Benchmarks behind `microvm bench`: boot timeline, host memory footprint, VM rate.

boot.py, footprint.py and rate.py measure; report.py turns samples into
statistics, tables, JSON, CSV and plots; microvm.lane re-runs a benchmark
inside the hardware-virtualization lane where /dev/kvm is PVM.
"""
