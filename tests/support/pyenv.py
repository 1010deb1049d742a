"""The small venv the sandbox tests' guests run (and its root image).

Made once and kept in the microvm cache, keyed by this Python and the list
of requirements: the agent's (msgpack, cloudpickle, tblib) and pytest, for
the pytest plugin's guest side. Not under /tmp: the guest mounts a tmpfs
there, so an image of a venv there is refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

VENV_REQUIREMENTS = ("msgpack", "tblib", "cloudpickle", "pytest")

# The user's cache, read before a fixture points MICROVM_CACHE at a test's own.
USER_CACHE = Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm")


def test_venv() -> Path:
    base = USER_CACHE / "test-venvs"
    ident = "\n".join([os.path.realpath(sys.executable), sys.version, *VENV_REQUIREMENTS])
    venv = base / hashlib.sha256(ident.encode()).hexdigest()[:12]
    done = venv / ".complete"
    if done.exists():
        return venv
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{venv.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be making it
        if not done.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = subprocess.run([str(venv / "bin" / "python3"), "-m", "pip", "install", "-q",
                                  "--disable-pip-version-check", *VENV_REQUIREMENTS], capture_output=True, text=True)
            assert pip.returncode == 0, pip.stderr
            done.touch()
    return venv


def test_image():  # type: ignore[no-untyped-def]
    """The PythonImage of test_venv(), built once (cached by microvm.pyimage)."""
    from microvm.pyimage import python_image

    return python_image(venv=test_venv())
