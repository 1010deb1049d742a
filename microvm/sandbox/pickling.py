"""What a call ships: the function and its arguments, pickled for the guest.

cloudpickle pickles a function by reference (module and name) when the
guest can import it, and by value otherwise. The guest can import the
standard library and the distributions in its image (PythonImage.modules).
A module the host loaded from outside its site-packages (a test module, a
script's own modules, an editable install) that the image does not have is
registered for pickling by value before the call is pickled, so `call`
works for a function defined in a test file. An installed distribution the
image lacks stays by reference: the guest's ImportError names it.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from microvm.errors import MicroVMError


class SerializationError(MicroVMError, TypeError):
    """The function, its arguments or its result cannot be pickled."""


_lock = threading.Lock()
_decided: dict[str, bool] = {}  # top-level module name -> pickled by value (decided once)
_decided_for: frozenset[str] | None = None


def _register_by_value(importable: frozenset[str]) -> None:
    import cloudpickle

    global _decided_for
    with _lock:
        if importable is not _decided_for:  # another image: decide again (registrations only add)
            _decided.clear()
            _decided_for = importable
        if len(_decided) >= len(sys.modules):  # nothing new was imported since (the common case)
            return
        for name in list(sys.modules):
            top = name.partition(".")[0]
            if top in _decided:
                continue
            module = sys.modules.get(top)
            by_value = not (top in importable or top in sys.stdlib_module_names or top in sys.builtin_module_names
                            or top == "__main__" or module is None or _installed(module))
            if by_value:
                cloudpickle.register_pickle_by_value(module)
            _decided[top] = by_value


@functools.cache
def _site_dirs() -> tuple[str, ...]:
    dirs = {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
            sysconfig.get_paths()["platlib"]}
    return tuple(os.path.realpath(d) + os.sep for d in dirs if d)


def _installed(module: ModuleType) -> bool:
    """An installed distribution's module (under a site-packages directory): pickled by reference,
    and the guest must have it (an ImportError there names it)."""
    file = getattr(module, "__file__", None)
    paths = [file] if file else list(getattr(module, "__path__", []) or [])
    return bool(paths) and all(os.path.realpath(p).startswith(_site_dirs()) for p in paths)


def dumps_call(fn: Callable[..., Any], args: Iterable[Any], kwargs: dict[str, Any],
               importable: frozenset[str]) -> bytes:
    """The call as bytes, or SerializationError naming what cannot be pickled."""
    import cloudpickle

    if not callable(fn):
        raise SerializationError(f"{fn!r} is not callable")
    _register_by_value(importable)
    try:
        return cloudpickle.dumps((fn, tuple(args), kwargs))
    except Exception as e:
        raise SerializationError(f"cannot pickle the call to {getattr(fn, '__qualname__', fn)!r}: "
                                 f"{type(e).__name__}: {e}") from e


def loads(data: bytes, what: str) -> Any:
    import cloudpickle

    # A guest exception pickled with tblib names tblib's own unpickling functions:
    # nothing to install here.
    try:
        return cloudpickle.loads(data)
    except Exception as e:
        raise SerializationError(f"cannot unpickle the {what} on the host: {type(e).__name__}: {e}") from e
