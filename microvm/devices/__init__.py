"""Device models. A device implements read/write at offsets in its range
(microvm.bus.BusDevice) and never touches KVM: interrupts go out through an
Irq object, guest memory through GuestMemory."""

from __future__ import annotations

from typing import Protocol


class Irq(Protocol):
    """An interrupt line as a device sees it (an irqfd, or a fake in tests)."""

    def trigger(self) -> None: ...
