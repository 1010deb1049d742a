from collections.abc import Iterable, Mapping

ACTIONS: tuple[str, ...]

def syscall_number(name: str) -> int: ...
def confine(default: str, allow: Iterable[str], arg0: Mapping[str, Iterable[int]] | None = None,
            arg1: Mapping[str, Iterable[int]] | None = None, errno_calls: Mapping[str, int] | None = None,
            err: int = 1) -> None: ...
