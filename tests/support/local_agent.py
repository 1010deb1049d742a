"""The guest agent run on the host, behind a Session: a Sandbox stand-in with no VM.

For tests of what sits on top of a sandbox (the pytest plugin) where no
guest can boot: the agent is the one a Sandbox ships (agent_files()),
started with `python -m microvm_agent --unix PATH`, and the Session talks
to it exactly as to one in a guest. The "guest" here is this host: its
files, its boot id, this Python.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from microvm.agent.server import READY_LINE
from microvm.sandbox.client import AgentClient
from microvm.sandbox.core import agent_files
from microvm.sandbox.session import Session


class LocalAgent(Session):
    def __init__(self, timeout: float | None = None, env: dict[str, str] | None = None):
        self._dir = tempfile.TemporaryDirectory(prefix="microvm-agent-")
        work = Path(self._dir.name)
        for name, data in agent_files().items():
            path = work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        sock_path = str(work / "agent.sock")
        # What a guest's agent would not have: the outer pytest's own settings.
        agent_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MICROVM_PYTEST"))}
        agent_env.update(env or {}, PYTHONPATH=str(work / "lib"))
        self.proc = subprocess.Popen([sys.executable, "-m", "microvm_agent", "--unix", sock_path], env=agent_env,
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert READY_LINE in line, f"the local agent did not start: {line!r}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        super().__init__(AgentClient(sock), timeout=timeout)
        self.boot_id = f"local-{self.proc.pid}"
        self.image = SimpleNamespace(python=sys.executable)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        deadline = time.monotonic() + 5
        while True:  # a request's process may still be writing in the directory
            try:
                self._dir.cleanup()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
