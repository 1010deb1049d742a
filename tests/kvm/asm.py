"""Assemble tiny guests with GNU as (binutils) into flat binaries."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from pathlib import Path


@functools.cache
def assemble(source: str, bits: int = 64, origin: int = 0x1000) -> bytes:
    """Assemble Intel-syntax `source` for `bits`-bit mode, linked to run at `origin`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "g.s")
        src.write_text(f".intel_syntax noprefix\n.code{bits}\n{source}\n")
        obj = Path(tmp, "g.o")
        binary = Path(tmp, "g.bin")
        subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", f"-Ttext={origin:#x}", "--oformat", "binary",
                        "-o", str(binary), str(obj)], check=True, capture_output=True)
        return binary.read_bytes()
