"""A vmlinux's function symbols, for naming guest addresses: an initcall
that %pS printed bare (our kernel has no kallsyms: benchmarks/initcalls.py),
or where a hung vCPU is (hangreport.py). A kernel without relocation runs at
its link addresses, so the symbol table names them as they are."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable
from pathlib import Path

STT_FUNC = 2
_ELF64_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size


class Symbols:
    """Function symbols of a vmlinux, for naming addresses."""

    def __init__(self, functions: Iterable[tuple[int, int, str]]):
        """functions: (address, size, name)."""
        ordered = sorted(f for f in functions if f[0])
        self._starts = [f[0] for f in ordered]
        self._functions = ordered

    @classmethod
    def of(cls, vmlinux: Path) -> Symbols:
        from elftools.elf.elffile import ELFFile
        from elftools.elf.sections import SymbolTableSection

        with open(vmlinux, "rb") as f:
            symtab = ELFFile(f).get_section_by_name(".symtab")
            if not isinstance(symtab, SymbolTableSection):
                return cls([])
            return cls((s["st_value"], s["st_size"], s.name) for s in symtab.iter_symbols()
                       if s["st_info"]["type"] == "STT_FUNC")

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
        return name if addr == start else f"{name}+{addr - start:#x}"


def functions_at(vmlinux: Path, addrs: Iterable[int]) -> dict[int, str]:
    """name+offset of the function holding each of `addrs` (those found): one
    pass over the raw symbol table, no object per symbol (Symbols.of builds
    one each: seconds for a vmlinux where Python is slow, as in the lane)."""
    from elftools.elf.elffile import ELFFile

    wanted = sorted(set(addrs))
    best: dict[int, tuple[int, int, int]] = {}  # addr -> (start, size, st_name) of the closest function below
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        symtab, strtab = elf.get_section_by_name(".symtab"), elf.get_section_by_name(".strtab")
        if symtab is None or strtab is None or symtab["sh_entsize"] != _ELF64_SYM.size:
            return {}
        table, names = symtab.data(), strtab.data()
    for st_name, info, _other, _shndx, value, size in _ELF64_SYM.iter_unpack(table):
        if info & 0xF != STT_FUNC or not value:
            continue
        for addr in wanted:
            if value <= addr < value + max(size, 1) and (addr not in best or value > best[addr][0]):
                best[addr] = (value, size, st_name)
    found = {}
    for addr, (start, _size, st_name) in best.items():
        name = names[st_name:names.index(b"\0", st_name)].decode(errors="replace")
        found[addr] = name if addr == start else f"{name}+{addr - start:#x}"
    return found
