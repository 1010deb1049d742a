"""vm.IrqLine: a device's interrupt, pulsed with KVM_IRQ_LINE from the calling thread (real /dev/kvm)."""

from __future__ import annotations

import threading

import pytest

from microvm.vm import Vm


def test_a_line_pulses_from_any_thread_and_does_nothing_once_closed() -> None:
    with Vm([(0, 1 << 20)], irqchip=True) as vm:
        line = vm.irq_line(5)
        line.trigger()
        done = []
        t = threading.Thread(target=lambda: done.append(line.trigger()))
        t.start()
        t.join()
        assert done == [None]
        line.close()
        line.trigger()  # after close: nothing, and no error (a device thread racing the teardown)


def test_a_line_without_the_irqchip_is_an_error_naming_the_ioctl() -> None:
    with Vm([(0, 1 << 20)], irqchip=False) as vm:
        with pytest.raises(OSError, match="KVM_IRQ_LINE"):
            vm.irq_line(5).trigger()
