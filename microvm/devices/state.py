"""Device state as plain data, for snapshots: what every restore_state checks.

Each device the device manager holds has two methods:

- snapshot_state() -> dict: its guest-visible state as msgpack-able data
  (int, bool, str, bytes, None, lists, dicts with str keys), with a "kind"
  key naming the device. Called while the VM is paused: no vCPU in KVM_RUN,
  every I/O thread parked, so no request is in flight.
- restore_state(state): on a freshly built device of the same kind and
  configuration, wired as the original was, before any vCPU runs. A state
  that is malformed or does not fit this device is a SnapshotError naming
  the device kind and what differs, never a crash: a state file is as
  untrusted as a guest.

Counters (stats) are not state: a restored device counts from zero.
"""

from __future__ import annotations

from typing import Any

from microvm.errors import SnapshotError

U8 = 0xFF
U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF

State = dict[str, Any]


class Fields:
    """Typed, checked access to one device's state; every failure is a SnapshotError
    that starts with the device's kind (or label)."""

    def __init__(self, state: object, kind: str, label: str | None = None):
        """`label` names the device in messages, if `kind` alone would not (a transport's)."""
        self.kind = kind
        self.label = label or kind
        if not isinstance(state, dict):
            raise self.error(f"the state is a {type(state).__name__}, not a dict")
        got = state.get("kind")
        if got != kind:
            raise self.error(f"the state is of a {got!r} device" if got is not None else "the state has no 'kind'")
        self.state: State = state

    def error(self, what: str) -> SnapshotError:
        return SnapshotError(f"{self.label} state: {what}")

    def _get(self, key: str) -> object:
        try:
            return self.state[key]
        except KeyError:
            raise self.error(f"{key!r} is missing") from None

    def integer(self, key: str, lo: int = 0, hi: int = U64) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(f"{key} is {value!r}, not an integer in {lo}..{hi:#x}")
        return value

    def optional_integer(self, key: str, lo: int = 0, hi: int = U64) -> int | None:
        return None if self._get(key) is None else self.integer(key, lo, hi)

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.error(f"{key} is {value!r}, not a bool")
        return value

    def blob(self, key: str, max_len: int) -> bytes:
        value = self._get(key)
        if not isinstance(value, bytes) or len(value) > max_len:
            raise self.error(f"{key} is not bytes of at most {max_len}")
        return value

    def sequence(self, key: str) -> list[Any]:
        value = self._get(key)
        if not isinstance(value, list):
            raise self.error(f"{key} is not a list")
        return value

    def value(self, key: str) -> object:
        return self._get(key)

    def same(self, key: str, here: object) -> None:
        """The state's `key` must be what this device has (a configuration it cannot take over)."""
        value = self._get(key)
        if value != here or type(value) is not type(here):
            raise self.error(f"{key} differs: the state has {value!r}, this device {here!r}")
