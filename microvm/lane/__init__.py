"""The hardware-virtualization lane: run a host command where /dev/kvm is real KVM.

On a PVM host guest kernel mode is emulated instruction by instruction, so an
unmodified Linux kernel cannot run there. The lane boots Debian's stock 6.1
kernel in QEMU (TCG, emulated AMD-V) over the host's own files and runs the
command inside, where /dev/kvm is nested KVM with hardware semantics.

  run.py     one run: QEMU, the 9p shares, the console (run_in_lane)
  initrd.py  the lane's initramfs and /init
  kernel.py  the lane's kernel, fetched with apt once and cached
  cli.py     the command line behind tests/hwvirt/run (main)
  rerun.py   a benchmark that re-runs itself in the lane on a PVM host
  modules.py inside the lane: load a module of its kernel that /init did not (vhost_vsock)
"""

from microvm.errors import LaneError, LaneFrozen, LaneTimeout
from microvm.lane.cli import main
from microvm.lane.rerun import in_lane, rerun_in_lane_if_pvm
from microvm.lane.run import LaneResult, lane_available, run_in_lane

__all__ = ["LaneError", "LaneFrozen", "LaneResult", "LaneTimeout", "in_lane", "lane_available", "main",
           "rerun_in_lane_if_pvm", "run_in_lane"]
