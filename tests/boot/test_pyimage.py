"""The Python root image (microvm/pyimage.py) in a real guest: `python3` is the
venv's interpreter, with the venv's modules and the stdlib's C extensions, on a
read-only root."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from microvm.machine import MicroVM
from microvm.pyimage import python_image
from microvm.specs import Drive


def test_python_image_runs_the_venvs_python() -> None:
    # Not under /tmp, which the guest mounts over; removed afterwards, image and all.
    cache = Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="test-pyimage-") as tmp:
        venv = Path(tmp, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        (site / "hello_microvm.py").write_text("GREETING = 'hello from the venv'\n")
        image = python_image(venv=venv)
        try:
            r = MicroVM(rootfs=Drive(image.path, read_only=True), mem_mib=256).run(
                ["python3", "-c", "import sys, hello_microvm, ssl, sqlite3, ctypes; "
                                  "print(sys.prefix, hello_microvm.GREETING)"], timeout=300)
        finally:
            for path in (image.path, image.manifest, image.path.with_suffix(".lock")):
                path.unlink(missing_ok=True)
    assert r.exit_code == 0, r.console[-2000:]
    assert r.stdout == f"{venv} hello from the venv\n".encode()
