"""Boot time, microvm against QEMU: `microvm bench boot --runs 20 --cli --qemu` (microvm/benchmarks/boot.py).

Compares MicroVM.start() to the command's end, `microvm run -- true` as a
whole process and QEMU's microvm machine on the same kernel and initramfs.

    python bench/boot.py [--runs 20] [--kernel vmlinux|bzImage] [--no-qemu] [--out DIR]

The flags are the command's (`--help`: more configurations, --mem, --vcpus,
...), after those defaults. Old flags: `--kernel vmlinux|bzImage` means
`--kernel-format elf|bzimage` (a kernel file is no longer taken: the command
boots our cached kernel); `--json FILE` means `--out` FILE's directory, where
the results are boot.json, boot.csv and boot.png; `--no-qemu` as before.
"""

from _entry import run

if __name__ == "__main__":
    run("boot")
