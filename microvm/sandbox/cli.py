"""`microvm call` and `microvm exec`: a sandbox from the shell.

    microvm call json:dumps '{"a": 1}'        # a function, in a fresh VM; prints repr(result)
    microvm exec -- python3 -c 'print(1)'     # one command, its output streamed, its status
    printf 'uname -r\\nls /\\n' | microvm exec   # one VM, a command per line of stdin
"""

from __future__ import annotations

import ast
import importlib
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

from microvm.clierrors import one_line_errors
from microvm.errors import ConfigError, RemoteError


def _sandbox_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--image", type=click.Path(dir_okay=False), default=None,
                     help="A Python root image (.ext4 or its .json) from `microvm image python`."),
        click.option("--venv", type=click.Path(file_okay=False), default=None,
                     help="Build (once) the image from this venv (default: this Python's environment)."),
        click.option("--mem", "mem_mib", type=int, default=256, show_default=True, help="Guest RAM in MiB."),
        click.option("--vcpus", type=int, default=1, show_default=True),
        click.option("--timeout", type=float, default=None, help="Seconds per call or command (default: none)."),
        click.option("--force", is_flag=True, help="Run even where the host looks unable (PVM)."),
    ]):
        fn = option(fn)
    return fn


def _sandbox(image: str | None, venv: str | None, mem_mib: int, vcpus: int, timeout: float | None,
             force: bool) -> Any:
    from microvm.sandbox import Sandbox

    if image and venv:
        raise click.UsageError("give --image or --venv, not both")
    if venv:
        from microvm.pyimage import python_image

        image_value: Any = python_image(venv=venv)
    else:
        image_value = image
    return Sandbox(image=image_value, mem_mib=mem_mib, vcpus=vcpus, timeout=timeout, force=force)


def _argument(text: str) -> Any:
    """A Python literal if it is one (42, 'x', [1, 2]), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _function(target: str) -> Callable[..., Any]:
    module_name, _, name = target.partition(":")
    if not module_name or not name:
        raise ConfigError(f"expected MODULE:FUNCTION, got {target!r}")
    sys.path.insert(0, os.getcwd())  # like `python -m`: the current directory's modules
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r}: {e}") from e
    fn: Any = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"{module_name!r} has no {name!r}")
    if not callable(fn):
        raise ConfigError(f"{target} is not callable")
    return fn


@click.command("call")
@_sandbox_options
@click.argument("target")
@click.argument("args", nargs=-1)
@one_line_errors
def call(target: str, args: tuple[str, ...], **options: Any) -> None:
    """Call MODULE:FUNCTION(ARGS...) in a fresh VM and print repr() of its result.

    Each ARG is a Python literal where it parses as one, else a string.
    """
    fn = _function(target)
    values = [_argument(a) for a in args]
    with _sandbox(**options) as sb:
        try:
            result = sb.call(fn, *values)
        except RemoteError:
            raise
        except Exception as e:
            notes = "".join(getattr(e, "__notes__", []))
            click.echo(notes.strip() or f"{type(e).__name__}: {e}", err=True)
            click.echo(f"microvm: error: the call raised {type(e).__name__}: {e}", err=True)
            sys.exit(1)
    click.echo(repr(result))


@click.command("exec", context_settings={"allow_interspersed_args": False})
@_sandbox_options
@click.argument("argv", nargs=-1)
@one_line_errors
def exec_(argv: tuple[str, ...], **options: Any) -> None:
    """Run a command in a VM through its agent, output streamed; with no
    command, run each line of stdin as a command in that same VM."""
    status = 0
    with _sandbox(**options) as sb:
        commands = [list(argv)] if argv else (shlex.split(line) for line in sys.stdin)
        for command in commands:
            if not command:
                continue
            stream = sb.exec_stream(command)
            for fd, data in stream:
                out = sys.stderr.buffer if fd == 2 else sys.stdout.buffer
                out.write(data)
                out.flush()
            status = stream.returncode or 0
    sys.exit(status)
