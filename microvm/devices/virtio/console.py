"""virtio-console, one port, no multiport (virtio 1.2, section 5.3).

Queue 0 is port 0's receiveq (host to guest), queue 1 its transmitq. Linux
makes it /dev/hvc0. The guest's writes arrive in whole buffers (up to a
page each) with one notification, instead of one exit per byte as on a UART.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from microvm.devices.state import Fields, State
from microvm.devices.virtio import VIRTIO_ID_CONSOLE, QueueState, config_read
from microvm.devices.virtio.queue import Descriptor, DescriptorChain
from microvm.memory import GuestMemory

RX_QUEUE = 0
TX_QUEUE = 1
QUEUE_SIZE = 256
MAX_PENDING_INPUT = 1 << 20

# struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }
_CONFIG = bytes(12)


class VirtioConsole(QueueState):
    device_type = VIRTIO_ID_CONSOLE
    features = 0
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: Callable[[bytes], None], on_reset: Callable[[], None] | None = None):
        """on_reset: called when a driver that had set the device up resets it."""
        self.output = output
        self.on_reset = on_reset
        super().__init__()
        self._input: deque[bytes] = deque()
        self._input_len = 0
        self._lock = threading.Lock()
        self.dropped_input = 0
        self.bytes_out = 0

    def snapshot_state(self) -> State:
        """Host input the guest has not taken yet."""
        with self._lock:
            return {"kind": "virtio-console", "input": b"".join(self._input)}

    def restore_state(self, state: State) -> None:
        data = Fields(state, "virtio-console").blob("input", MAX_PENDING_INPUT)
        with self._lock:
            self._input = deque([data] if data else [])
            self._input_len = len(data)

    def reset(self) -> None:
        live = self.mem is not None
        super().reset()
        if live and self.on_reset is not None:
            self.on_reset()

    def read_config(self, offset: int, size: int) -> int:
        return config_read(_CONFIG, offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which we do not offer

    def process(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self._transmit()
        elif queue_index == RX_QUEUE:
            self._receive()

    def _transmit(self) -> None:
        self.drain(TX_QUEUE, self._write_out)

    def _write_out(self, mem: GuestMemory, chain: DescriptorChain) -> int:
        for d in chain.readable:
            data = mem.read(d.addr, d.len)
            self.bytes_out += len(data)
            self.output(data)
        return 0

    def feed(self, data: bytes) -> None:
        """Host input for the guest's hvc0."""
        with self._lock:
            room = MAX_PENDING_INPUT - self._input_len
            if len(data) > room:
                self.dropped_input += len(data) - room
                data = data[:room]
            if data:
                self._input.append(data)
                self._input_len += len(data)

    def _receive(self) -> None:
        """Move pending host input into the guest's receive buffers."""
        q, mem = self.queues[RX_QUEUE], self.mem
        assert mem is not None and self.signal is not None
        used = False
        with self._lock:
            while self._input and (chain := q.pop()) is not None:
                q.add_used(chain.head, self._fill(mem, chain.writable))
                used = True
        if used:
            self.signal(RX_QUEUE)

    def _fill(self, mem: GuestMemory, buffers: list[Descriptor]) -> int:
        written = 0
        for d in buffers:
            offset = 0
            while self._input and offset < d.len:
                chunk = self._input.popleft()
                take, rest = chunk[:d.len - offset], chunk[d.len - offset:]
                mem.write(d.addr + offset, take)
                offset += len(take)
                if rest:
                    self._input.appendleft(rest)
            self._input_len -= offset
            written += offset
            if not self._input:
                break
        return written
