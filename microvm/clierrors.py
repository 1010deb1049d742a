"""The CLIs' error handling, below both microvm.cli and microvm.benchmarks.cli:
a MicroVMError is one line on stderr and exit 1, an interrupt exit 130 (as a
shell reports SIGINT)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from microvm.errors import MicroVMError

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MicroVMError as e:
            # One line: the first line of the message names the problem.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"microvm: error: {first}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            # The VM is already gone (wait() frees it before re-raising).
            click.echo("microvm: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
