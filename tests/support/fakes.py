"""Small stand-ins the unit tests share."""

from __future__ import annotations


class FakeIrq:
    """An interrupt line that counts its triggers."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
