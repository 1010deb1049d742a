"""Sandboxed Python functions and commands in micro-VMs (core.py has the design)."""

from microvm.errors import AgentError, CallTimeout, RemoteError, SandboxCrashed, SandboxError
from microvm.sandbox.aio import AsyncSandbox
from microvm.sandbox.core import Sandbox
from microvm.sandbox.pickling import SerializationError
from microvm.sandbox.pool import Executor, SandboxPool
from microvm.sandbox.session import CallFuture, CallKilled, ExecStream, Session

__all__ = ["AgentError", "AsyncSandbox", "CallFuture", "CallKilled", "CallTimeout", "ExecStream", "Executor",
           "RemoteError", "Sandbox", "SandboxCrashed", "SandboxError", "SandboxPool", "SerializationError",
           "Session"]
