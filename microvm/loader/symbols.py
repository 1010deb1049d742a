"""A vmlinux's function symbols, for naming guest addresses: an initcall
that %pS printed bare (our kernel has no kallsyms: benchmarks/initcalls.py),
or where a hung vCPU is (hangreport.py). A kernel without relocation runs at
its link addresses, so the symbol table names them as they are."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from pathlib import Path

from microvm.loader.elf import ELF64_SYM, symbol_tables

STT_FUNC = 2


class Symbols:
    """Function symbols of a vmlinux, for naming addresses."""

    def __init__(self, functions: Iterable[tuple[int, int, str]]):
        """functions: (address, size, name)."""
        ordered = sorted(f for f in functions if f[0])
        self._starts = [f[0] for f in ordered]
        self._functions = ordered

    @classmethod
    def of(cls, vmlinux: Path) -> Symbols:
        table, names = _symbol_tables(vmlinux)
        return cls((value, size, _name(names, st_name)) for value, size, st_name in _functions(table))

    def name(self, text: str) -> str:
        """`text` (0x... as %pS prints without kallsyms) as name+offset; anything else as it is."""
        if not text.startswith("0x"):
            return text
        try:
            addr = int(text, 16)
        except ValueError:
            return text
        return self.at(addr) or text

    def at(self, addr: int) -> str | None:
        """name+offset of the function holding `addr`, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start, size, name = self._functions[i]
        if size and addr >= start + size:
            return None
        return _name_offset(name, start, addr)


def functions_at(vmlinux: Path, addrs: Iterable[int]) -> dict[int, str]:
    """name+offset of the function holding each of `addrs` (those found): one
    pass over the raw symbol table, decoding only the names it reports (a
    Symbols decodes and sorts every function's: cheap here, seconds where
    Python is slow, as in the lane)."""
    wanted = sorted(set(addrs))
    table, names = _symbol_tables(vmlinux)
    best: dict[int, tuple[int, int]] = {}  # addr -> (start, st_name) of the closest function below
    for value, size, st_name in _functions(table):
        for addr in wanted:
            if value <= addr < value + max(size, 1) and (addr not in best or value > best[addr][0]):
                best[addr] = (value, st_name)
    return {addr: _name_offset(_name(names, st_name), start, addr) for addr, (start, st_name) in best.items()}


def _symbol_tables(vmlinux: Path) -> tuple[bytes, bytes]:
    """The raw .symtab and .strtab of an ELF64 file (empty when it has none)."""
    return symbol_tables(vmlinux)


def _functions(table: bytes) -> Iterator[tuple[int, int, int]]:
    """(address, size, name offset) of each function symbol with an address."""
    for st_name, info, _other, _shndx, value, size in ELF64_SYM.iter_unpack(table):
        if info & 0xF == STT_FUNC and value:
            yield value, size, st_name


def _name(names: bytes, offset: int) -> str:
    end = names.find(b"\0", offset)
    return names[offset:end if end >= 0 else len(names)].decode(errors="replace")


def _name_offset(name: str, start: int, addr: int) -> str:
    return name if addr == start else f"{name}+{addr - start:#x}"
