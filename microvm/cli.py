"""The `microvm` command line. Errors are one line on stderr and exit 1."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from microvm.errors import MicroVMError

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MicroVMError as e:
            click.echo(f"microvm: error: {e}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.version_option(package_name="microvm")
def main() -> None:
    """Hardware-isolated micro-VMs, straight over /dev/kvm."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_one_line_errors
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


@main.group()
def kernel() -> None:
    """The guest kernel microvm builds and caches."""


@kernel.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel make jobs.")
@_one_line_errors
def kernel_build(force: bool, jobs: int | None) -> None:
    """Build the default guest kernel from linux-source-6.1 (cached)."""
    from microvm.kernelbuild import build_kernel

    art = build_kernel(force=force, jobs=jobs)
    click.echo(f"vmlinux: {art.vmlinux}\nbzImage: {art.bzimage}")


@kernel.command("path")
@_one_line_errors
def kernel_path() -> None:
    """Print the cached default kernel (vmlinux), if built."""
    from microvm.kernelbuild import find_default_kernel

    art = find_default_kernel()
    if art is None:
        raise MicroVMError("no default kernel built yet: run `microvm kernel build`")
    click.echo(str(art.vmlinux))


if __name__ == "__main__":
    main()
