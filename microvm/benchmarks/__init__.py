"""Benchmarks behind `microvm bench` (cli.py); bench/*.py are entry points to them.

  boot.py       boot timeline per configuration, against `microvm run` and QEMU
  footprint.py  host memory of the VMM beyond guest pages
  rate.py       VMs booted, run and torn down per second
  blk.py        virtio-blk with fio, against QEMU     } the same guest script
  net.py        virtio-net over a tap, against QEMU   } on both sides: ab.py
  call.py       a call into a running sandbox, against the agent under QEMU's vhost-vsock
  exits.py      one port-I/O exit, our loop against a bare C one (exits_raw.c)
  startup.py    the VMM's own start-up, a tiny PVH guest, against QEMU

qemu.py is the one QEMU runner; guest.py our cached kernel and the error of a
failed run; report.py statistics, tables (the A/B table among them), JSON,
CSV; plot.py the boot figure (matplotlib, the `bench` extra); workers.py
processes of their own; options.py what the options may be; scripts.py the
old flags of bench/*.py. microvm.lane re-runs a benchmark inside the
hardware-virtualization lane where /dev/kvm is PVM.
"""
