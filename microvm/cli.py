"""The `microvm` command line. Errors are one line on stderr and exit 1 (usage
errors exit 2, an interrupt 130, as a shell reports SIGINT)."""

from __future__ import annotations

import importlib
import json
import sys
from typing import TYPE_CHECKING

import click

from microvm.clierrors import one_line_errors
from microvm.errors import MicroVMError

if TYPE_CHECKING:
    from microvm.jail import Jail

# Commands of other modules, imported only when asked for (or listed): `microvm
# run` need not pay for the benchmarks' and the sandbox's imports (rich,
# asyncio, ...), a fifth of its start-up (`microvm bench startup`).
LAZY_COMMANDS = {"bench": "microvm.benchmarks.cli:bench", "call": "microvm.sandbox.cli:call",
                 "exec": "microvm.sandbox.cli:exec_"}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[name].partition(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup)
@click.version_option(package_name="microvm")
def main() -> None:
    """Hardware-isolated micro-VMs, straight over /dev/kvm."""


def _jail(user: str) -> Jail:
    from microvm.errors import ConfigError
    from microvm.jail import Jail

    uid, sep, gid = user.partition(":")
    if not (uid.isdigit() and sep and gid.isdigit()):
        raise ConfigError(f"--jail-user must be UID:GID (numbers), got {user!r}")
    return Jail(uid=int(uid), gid=int(gid))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@one_line_errors
def doctor(as_json: bool) -> None:
    """Show what this host's KVM can do and whether Linux guests can run."""
    from microvm.doctor import Verdict, diagnose, render

    report = diagnose()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render(report))
    if report.verdict == Verdict.NO_KVM.value:
        sys.exit(2)


def _timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    from microvm.checks import timeout
    from microvm.errors import ConfigError

    try:
        return timeout(value, "--timeout")
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix("--timeout "), ctx, param) from None


# Options end at the first argument (or `--`): the rest is the guest's command,
# `-` options included, while a mistyped option of ours is a usage error.
@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--kernel", type=click.Path(dir_okay=False), help="vmlinux (ELF, PVH) or bzImage.")
@click.option("--initrd", type=click.Path(dir_okay=False), help="An initramfs instead of ours.")
@click.option("--mem", "mem_mib", type=int, default=128, show_default=True, help="Guest RAM in MiB.")
@click.option("--vcpus", type=int, default=1, show_default=True)
@click.option("--append", default="", help="Extra kernel command line arguments.")
@click.option("--drive", "drives", multiple=True, metavar="PATH[,ro][,record=LOG]",
              help="A raw disk image: /dev/vda, /dev/vdb, ... in order. record=LOG logs its writes and "
                   "flushes (microvm/backends/recording.py).")
@click.option("--rootfs", type=click.Path(dir_okay=False), default=None,
              help="An ext4 root image (/dev/vda); the command runs inside it.")
@click.option("--net", "nets", multiple=True, metavar="tap=NAME[,mac=..][,ip=..][,host_ip=..]",
              help="A network card on a tap (created unless it exists): eth0, eth1, ... in order. "
                   "ip/host_ip are ADDR/PREFIX; also netns=NS, bridge=BR.")
@click.option("--cmdline", default=None, help="Replace the whole kernel command line.")
@click.option("--timeout", type=float, default=None, callback=_timeout, help="Kill the guest after S seconds.")
@click.option("--force", is_flag=True, help="Run even where the host cannot run Linux guests (PVM).")
@click.option("--console", "show_console", is_flag=True,
              help="Show the kernel's and init's console messages too, interleaved with the command's output.")
@click.option("--full-log", is_flag=True,
              help="Show every kernel message, as --console does, but printed once the guest is done: "
                   "cheap (live, only warnings and worse cross the serial port).")
@click.option("--timeline", "show_timeline", is_flag=True, help="Print the boot timeline to stderr.")
@click.option("--seccomp", type=click.Choice(["auto", "kill", "errno", "log", "off"]), default="auto",
              show_default=True, help="What a VMM thread's forbidden system call meets (microvm/seccomp.py): "
                                      "auto is kill when jailed, errno otherwise; off: no filter.")
@click.option("--jail", is_flag=True, help="Run the VMM jailed: own namespaces, an empty root, no capabilities, "
                                           "the --jail-user's uid and gid, a cgroup with the VM's limits.")
@click.option("--jail-user", default="65534:65534", show_default=True, metavar="UID:GID",
              help="Who the jailed VMM becomes.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@one_line_errors
def run(kernel: str | None, initrd: str | None, mem_mib: int, vcpus: int, append: str,
        drives: tuple[str, ...], rootfs: str | None, nets: tuple[str, ...], cmdline: str | None,
        timeout: float | None, force: bool, show_console: bool, full_log: bool, show_timeline: bool,
        seccomp: str, jail: bool, jail_user: str, command: tuple[str, ...]) -> None:
    """Boot a micro-VM and run COMMAND in it (no COMMAND: an interactive shell).

    Prints the command's output and exits with its exit status.
    """
    from microvm.console import interactive
    from microvm.machine import Drive, MicroVM, Nic

    out = sys.stdout.buffer
    # The command's output always; the console (kernel, init) with --console
    # and in a shell, where it is the session itself; with --full-log, at the end.
    full_log = full_log and bool(command)
    vm = MicroVM(kernel, initrd=initrd, mem_mib=mem_mib, vcpus=vcpus, append=append,
                 cmdline=cmdline, force=force, drives=[Drive.parse(d) for d in drives],
                 rootfs=Drive.parse(rootfs) if rootfs else None, nics=[Nic.parse(n) for n in nets],
                 console=out if (show_console and not full_log) or not command else None, stdout=out,
                 full_log=full_log, seccomp=None if seccomp == "off" else seccomp,
                 jail=_jail(jail_user) if jail else None)
    if command:
        result = vm.run(list(command), timeout=timeout)
    else:
        result = interactive(vm, timeout)
    if full_log:
        out.write(result.console)
    out.flush()
    if show_timeline:
        for phase, t in result.timeline.items():
            click.echo(f"{phase:<18} {t * 1000:9.1f} ms", err=True)
    sys.exit(result.exit_code if result.exit_code is not None else 0)


@main.command()
@click.argument("directory", metavar="DIR", type=click.Path())
@click.option("--timeout", type=float, default=None, callback=_timeout, help="Kill the guest after S seconds.")
@click.option("--vsock", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Another host socket path than the snapshot's (the original may still hold it).")
@click.option("--prefetch", is_flag=True, help="Fault in the pages an earlier restore recorded in DIR/pages "
                   "(snapshot.record_pages) before the guest runs.")
@click.option("--verify", is_flag=True, help="Check guest RAM against its checksum first.")
@click.option("--force", is_flag=True, help="Restore even where the host cannot run Linux guests (PVM).")
@click.option("--console", "show_console", is_flag=True,
              help="Show the kernel's and init's console messages too, interleaved with the command's output.")
@one_line_errors
def restore(directory: str, timeout: float | None, vsock: str | None, prefetch: bool, verify: bool,
            force: bool, show_console: bool) -> None:
    """Restore a MicroVM snapshot from DIR and let its command finish.

    Prints what the command writes from the snapshot on (its output before
    the snapshot is not repeated) and exits with its exit status.
    """
    from pathlib import Path

    from microvm.errors import SnapshotError
    from microvm.machine import MicroVM
    from microvm.snapshot import Snapshot

    if not Path(directory).is_dir():
        raise SnapshotError(f"{directory} is not a snapshot: "
                            f"{'not a directory' if Path(directory).exists() else 'no such directory'}")
    if vsock is not None:
        # Checked before the guest runs: one that ran, even briefly, may have
        # written to its disk, and the snapshot would no longer restore.
        config = Snapshot.load(directory).state.get("config")
        if isinstance(config, dict) and config.get("vsock") is None:
            raise SnapshotError(f"{directory}: the snapshot's VM has no vsock device for --vsock")
    out = sys.stdout.buffer
    vm = MicroVM.restore(directory, vsock=vsock if vsock is not None else True, prefetch=prefetch, verify=verify,
                         force=force, console=out if show_console else None, stdout=out)
    result = vm.wait(timeout)  # result.stdout holds the output from before the snapshot too; not printed
    out.flush()
    sys.exit(result.exit_code if result.exit_code is not None else 0)


@main.group()
def image() -> None:
    """Disk images for --drive and --rootfs."""


@image.command("build")
@click.argument("source", type=click.Path(file_okay=False))
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--size", "size_mib", type=int, default=None, help="Image size in MiB (default: fits SOURCE).")
@one_line_errors
def image_build(source: str, dest: str, size_mib: int | None) -> None:
    """Make an ext4 image DEST from the directory SOURCE."""
    from microvm.images import build_ext4

    click.echo(str(build_ext4(source, dest, size_mib)))


@image.command("debian")
@click.option("--package", "packages", multiple=True, help="Extra Debian packages (python3 is always in).")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
@one_line_errors
def image_debian(packages: tuple[str, ...], force: bool) -> None:
    """Build (once, cached) a Debian root image with python3; prints its path."""
    from microvm.images import DEBIAN_PACKAGES, build_debian_image

    wanted = tuple(dict.fromkeys((*DEBIAN_PACKAGES, *packages)))
    click.echo(str(build_debian_image(wanted, force=force)))


@image.command("python")
@click.option("--venv", type=click.Path(file_okay=False), default=None,
              help="A virtual environment, with its interpreter (default: the Python running microvm).")
@click.option("--python", "python", type=click.Path(dir_okay=False), default=None,
              help="The interpreter, with its own environment (or the base of the -r venv).")
@click.option("-r", "requirements_file", type=click.Path(dir_okay=False), default=None,
              help="A requirements file: pip installs it into a fresh venv.")
@click.option("--requirement", "requirements", multiple=True, metavar="REQ",
              help="A requirement for that fresh venv (repeatable).")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
@one_line_errors
def image_python(venv: str | None, python: str | None, requirements_file: str | None,
                 requirements: tuple[str, ...], force: bool) -> None:
    """Build (once, cached) a root image with this host's Python and an environment; prints its path."""
    from pathlib import Path

    from microvm.pyimage import python_image

    if requirements_file and requirements:
        raise click.UsageError("give -r FILE or --requirement REQ, not both")
    reqs = Path(requirements_file) if requirements_file else list(requirements) or None
    img = python_image(venv=venv, requirements=reqs, python=python, force=force)
    click.echo(str(img.path))
    click.echo(f"{img.path.stat().st_size >> 20} MiB ({img.path.stat().st_blocks >> 11} MiB used): "
               f"python {img.version} at {img.python}, {len(img.distributions)} distributions", err=True)
    if img.missing_libraries:
        click.echo(f"warning: not found on this host either: {', '.join(img.missing_libraries)}", err=True)


@main.group()
def kernel() -> None:
    """The guest kernel microvm builds and caches."""


@kernel.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel make jobs.")
@one_line_errors
def kernel_build(force: bool, jobs: int | None) -> None:
    """Build the default guest kernel from linux-source-6.1 (cached)."""
    from microvm.kernelbuild import build_kernel

    art = build_kernel(force=force, jobs=jobs)
    click.echo(f"vmlinux: {art.vmlinux}\nbzImage: {art.bzimage}")


@kernel.command("path")
@one_line_errors
def kernel_path() -> None:
    """Print the cached default kernel (vmlinux), if built."""
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise MicroVMError("no default kernel built yet: run `microvm kernel build`")
    click.echo(str(art.vmlinux))


if __name__ == "__main__":
    main()
