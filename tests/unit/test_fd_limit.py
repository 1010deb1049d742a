"""A process running many VMs needs more than the usual 1024 open files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        from microvm.hostprocess import raise_fd_limit
        raise_fd_limit()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(soft, hard, resource.RLIM_INFINITY)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    soft, hard, infinity = (int(x) for x in out)
    assert soft == (1 << 20 if hard == infinity else hard)
