"""virtio-net (virtio 1.2, 5.1) driven through the MMIO transport by the fake
driver, with a SOCK_SEQPACKET socket pair standing in for the tap (FakeTap,
tests/support/fakes.py): one record per frame, like a tap opened with
IFF_VNET_HDR. No KVM needed.

Headers are packed here with `struct` from struct virtio_net_hdr_v1 in
include/uapi/linux/virtio_net.h, independently of net.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm import checks
from microvm.devices import virtio as v
from microvm.devices.virtio import mmio as m
from microvm.devices.virtio import net as n
from microvm.devices.virtio.net import VirtioNet
from microvm.errors import ConfigError
from microvm.memory import GuestMemory
from tests.support.fakes import FakeIrq, FakeTap
from tests.support.virtio_driver import VirtqDriver
from tests.unit.test_virtio_mmio import Driver

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

# flags u8, gso_type u8, hdr_len le16, gso_size le16, csum_start le16, csum_offset le16, num_buffers le16
HDR = struct.Struct("<BBHHHHH")
MEM = 4 << 20
RXQ, TXQ = 0, 1
MAC = "02:11:22:33:44:55"


def frame(payload_len: int, seed: int = 7, flags: int = 0) -> bytes:
    """A header and an Ethernet frame with a recognisable payload."""
    eth = bytes.fromhex("ffffffffffff" "021122334455" "0800")
    body = bytes((seed + i * 31) & 0xFF for i in range(payload_len))
    return HDR.pack(flags, 0, 0, 0, 0, 0, 0) + eth + body


class Nic:
    """A VirtioNet over a FakeTap, brought up by the fake driver."""

    def __init__(self, features: int | None = None, queue_size: int = 64):
        self.tap = FakeTap()
        self.dev = VirtioNet(self.tap, mac=MAC)
        self.mem = GuestMemory([(0, bytearray(MEM))])
        self.irq = FakeIrq()
        self.t = m.MmioTransport(self.dev, self.mem, self.irq)
        self.d = Driver(self.t, self.mem)
        offered = self.d.features()
        want = offered & ~(1 << v.VIRTIO_F_EVENT_IDX) if features is None else features | 1 << v.VIRTIO_F_VERSION_1
        assert self.d.negotiate(want)
        self.rx = self.setup(RXQ, queue_size, 0x10000, (0x100000, 0x280000))
        self.tx = self.setup(TXQ, queue_size, 0x20000, (0x280000, 0x400000))
        self.d.driver_ok()
        assert self.t.active
        self.addrs: dict[int, int] = {}  # receive buffer head -> its address

    def setup(self, index: int, size: int, base: int, data: tuple[int, int]) -> VirtqDriver:
        q = self.d.setup_queue(index, size, base)
        q.data_start, q.data_end = data
        q._next_data = data[0]
        return q

    def send(self, parts: list[bytes]) -> list[tuple[int, int]]:
        self.tx.add_chain([(p, False) for p in parts])
        self.t.notify(TXQ)
        return self.tx.used()

    def close(self) -> None:
        self.tap.close()


@pytest.fixture
def nic() -> Iterator[Nic]:
    x = Nic()
    yield x
    x.close()


def post_and_collect(x: Nic, sizes: list[int]) -> list[bytes]:
    for size in sizes:
        head = x.rx.add_chain([(size, True)])
        x.addrs[head] = x.rx.buffers[head][0][0]
    x.t.notify(RXQ)
    return [x.mem.read(x.addrs[h], length) for h, length in x.rx.used()]


def stats(x: Nic) -> dict[str, int]:
    return x.dev.stats()


# --- configuration ------------------------------------------------------------------------


def test_features_and_config(nic: Nic) -> None:
    feats = nic.d.features()
    for bit in (n.VIRTIO_NET_F_MAC, n.VIRTIO_NET_F_STATUS, n.VIRTIO_NET_F_MRG_RXBUF, n.VIRTIO_NET_F_CSUM,
                n.VIRTIO_NET_F_GUEST_CSUM, n.VIRTIO_NET_F_HOST_TSO4, n.VIRTIO_NET_F_GUEST_TSO4, n.VIRTIO_NET_F_MTU):
        assert feats >> bit & 1, bit
    cfg = m.VIRTIO_MMIO_CONFIG
    mac = bytes(nic.t.read(cfg + i, 1) for i in range(6))
    assert mac == bytes.fromhex(MAC.replace(":", ""))
    assert nic.t.read(cfg + 6, 2) == n.VIRTIO_NET_S_LINK_UP
    assert nic.t.read(cfg + 10, 2) == 1500
    assert nic.d.r(m.VIRTIO_MMIO_DEVICE_ID) == v.VIRTIO_ID_NET


def test_offloads_follow_negotiation() -> None:
    full = Nic()
    assert full.tap.offloads[-1] == n.TUN_F_CSUM | n.TUN_F_TSO4 | n.TUN_F_TSO6 | n.TUN_F_TSO_ECN
    full.d.w(m.VIRTIO_MMIO_STATUS, 0)  # reset: the tap must stop sending offloaded frames
    assert full.tap.offloads[-1] == 0
    full.close()
    plain = Nic(features=1 << n.VIRTIO_NET_F_MAC)
    assert plain.tap.offloads[-1] == 0
    plain.close()
    csum = Nic(features=1 << n.VIRTIO_NET_F_GUEST_CSUM)
    assert csum.tap.offloads[-1] == n.TUN_F_CSUM
    csum.close()


@pytest.mark.parametrize("bad", ["", "02:00:00:00:00", "zz:00:00:00:00:01", "01:00:00:00:00:01", "2:0:0:0:0:1"])
def test_bad_mac(bad: str) -> None:
    with pytest.raises(ConfigError):
        checks.parse_mac(bad)


def test_random_mac_is_local_unicast() -> None:
    raw = checks.parse_mac(n.random_mac())
    assert raw[0] == 0x02


# --- transmit ------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [[], [12], [12, 14], [5, 30, 100]])
def test_transmit_gathers_a_chain(nic: Nic, split: list[int]) -> None:
    data = frame(3000)
    parts, pos = [], 0
    for cut in split:
        parts.append(data[pos:cut])
        pos = cut
    parts.append(data[pos:])
    used = nic.send([p for p in parts if p])
    assert len(used) == 1 and used[0][1] == 0
    assert nic.tap.peer.recv(1 << 17) == data
    assert stats(nic)["tx_frames"] == 1
    assert nic.irq.count > 0


def test_transmit_indirect_and_large(nic: Nic) -> None:
    data = frame(65535 - 14)  # the largest GSO frame
    nic.tx.add_indirect_chain([(data[:12], False), (data[12:], False)])
    nic.t.notify(TXQ)
    assert [length for _, length in nic.tx.used()] == [0]
    assert nic.tap.peer.recv(1 << 17) == data


@pytest.mark.parametrize("parts,counter", [
    ([b"\0" * 20], "tx_malformed"),  # shorter than the headers
    ([b"\0" * (n.MAX_FRAME + 1)], "tx_oversized"),
])
def test_transmit_bad_frames_are_dropped(nic: Nic, parts: list[bytes], counter: str) -> None:
    used = nic.send(parts)
    assert len(used) == 1  # the buffer goes back to the guest all the same
    assert stats(nic)[counter] == 1
    assert nic.t.active
    nic.tap.peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        nic.tap.peer.recv(1 << 17)
    # and the next good frame still goes out
    nic.send([frame(100)])
    nic.tap.peer.setblocking(True)
    assert nic.tap.peer.recv(1 << 17) == frame(100)


def test_transmit_chain_with_writable_buffer_is_dropped(nic: Nic) -> None:
    nic.tx.add_chain([(frame(100), False), (64, True)])
    nic.t.notify(TXQ)
    assert len(nic.tx.used()) == 1
    assert stats(nic)["tx_malformed"] == 1
    assert nic.t.active


def test_transmit_host_refusal_is_counted(nic: Nic) -> None:
    nic.tap.peer.close()  # the other end refuses (EPIPE), like a tap rejecting a header
    nic.send([frame(100)])
    assert stats(nic)["tx_rejected"] == 1
    assert nic.t.active


# --- receive -------------------------------------------------------------------------------


def test_receive_mergeable_spreads_over_buffers(nic: Nic) -> None:
    data = frame(5000)
    nic.tap.peer.send(data)
    got = post_and_collect(nic, [1536] * 8)
    assert len(got) == 4  # 5026 bytes in 1536-byte buffers
    joined = b"".join(got)
    hdr = HDR.unpack(joined[:12])
    assert hdr[6] == 4  # num_buffers
    assert joined[12:] == data[12:]
    assert [len(g) for g in got] == [1536, 1536, 1536, len(data) - 3 * 1536]
    assert stats(nic)["rx_frames"] == 1
    # the four unused buffers take the next frames
    nic.tap.peer.send(frame(10, seed=1))
    nic.tap.peer.send(frame(20, seed=2))
    nic.t.notify(RXQ)
    used = nic.rx.used()
    assert [length for _, length in used] == [len(frame(10)), len(frame(20))]


def test_receive_waits_for_buffers(nic: Nic) -> None:
    data = frame(3000)
    nic.tap.peer.send(data)
    nic.t.notify(RXQ)  # no buffers yet: nothing happens, nothing is lost
    assert nic.rx.used() == []
    got = post_and_collect(nic, [1000, 1000])  # not enough: still waiting
    assert got == []
    got = post_and_collect(nic, [2000])
    assert b"".join(got)[12:] == data[12:]
    assert HDR.unpack(b"".join(got)[:12])[6] == 3


def test_receive_without_mergeable_uses_one_buffer_per_frame() -> None:
    x = Nic(features=1 << n.VIRTIO_NET_F_MAC)
    x.tap.peer.send(frame(5000, flags=n.VIRTIO_NET_HDR_F_DATA_VALID))
    x.tap.peer.send(frame(100))
    heads = [x.rx.add_chain([(12, True), (4000, True)]), x.rx.add_chain([(12, True), (65550, True)])]
    x.t.notify(RXQ)
    used = x.rx.used()
    # the first frame does not fit the first buffer: dropped and counted;
    # the second frame takes that buffer.
    assert stats(x)["rx_no_room"] == 1
    assert [h for h, _ in used] == [heads[0]]
    assert used[0][1] == len(frame(100))
    x.close()


def test_receive_clears_checksum_flags_for_a_plain_driver() -> None:
    x = Nic(features=1 << n.VIRTIO_NET_F_MRG_RXBUF)
    x.tap.peer.send(frame(64, flags=n.VIRTIO_NET_HDR_F_DATA_VALID))
    x.tap.peer.send(frame(64, flags=n.VIRTIO_NET_HDR_F_NEEDS_CSUM))  # its checksum is not finished: dropped
    got = post_and_collect(x, [2048, 2048])
    assert len(got) == 1 and HDR.unpack(got[0][:12])[:6] == (0, 0, 0, 0, 0, 0)
    assert stats(x)["rx_offload"] == 1
    x.close()


def test_receive_drops_segments_the_guest_did_not_negotiate() -> None:
    x = Nic(features=1 << n.VIRTIO_NET_F_MRG_RXBUF | 1 << n.VIRTIO_NET_F_GUEST_CSUM | 1 << n.VIRTIO_NET_F_GUEST_TSO4)
    big = bytearray(frame(3000, flags=n.VIRTIO_NET_HDR_F_NEEDS_CSUM))
    big[1] = n.VIRTIO_NET_HDR_GSO_TCPV6  # TSO6 not negotiated
    x.tap.peer.send(bytes(big))
    big[1] = n.VIRTIO_NET_HDR_GSO_TCPV4 | n.VIRTIO_NET_HDR_GSO_ECN  # ECN not negotiated
    x.tap.peer.send(bytes(big))
    big[1] = n.VIRTIO_NET_HDR_GSO_TCPV4
    x.tap.peer.send(bytes(big))
    got = post_and_collect(x, [4096] * 3)
    assert len(got) == 1 and got[0][1] == n.VIRTIO_NET_HDR_GSO_TCPV4
    assert stats(x)["rx_offload"] == 2
    x.close()


def test_empty_receive_descriptor_pointing_anywhere_is_harmless(nic: Nic) -> None:
    nic.tap.peer.send(frame(1500))
    head = nic.rx.add_chain([(1000, True), (1000, True)])
    first, second = nic.rx.chains[head]
    spare = nic.rx.free.pop(0)
    write_next = 2 | 1  # VRING_DESC_F_WRITE | VRING_DESC_F_NEXT
    # first -> an empty buffer far outside RAM -> second
    nic.rx.write_desc(spare, 0xDEAD_0000_0000, 0, write_next, second)
    nic.rx.write_desc(first, nic.rx.buffers[head][0][0], 1000, write_next, spare)
    nic.t.notify(RXQ)
    used = nic.rx.used()
    assert [length for _, length in used] == [len(frame(1500))]
    assert nic.t.active and not nic.t.errors


def test_receive_keeps_checksum_flags_when_negotiated(nic: Nic) -> None:
    nic.tap.peer.send(frame(64, flags=n.VIRTIO_NET_HDR_F_DATA_VALID))
    got = post_and_collect(nic, [2048])
    assert HDR.unpack(got[0][:12])[0] == n.VIRTIO_NET_HDR_F_DATA_VALID


def test_receive_drops_runt_and_oversized_frames(nic: Nic) -> None:
    nic.tap.peer.send(b"\0" * 20)
    nic.tap.peer.send(b"\0" * (n.MAX_FRAME + 10))
    nic.tap.peer.send(frame(50))
    got = post_and_collect(nic, [2048, 2048])
    assert len(got) == 1 and got[0][12:] == frame(50)[12:]
    assert stats(nic)["rx_malformed"] == 1
    assert stats(nic)["rx_oversized"] == 1


def test_receive_buffer_with_readable_descriptor_needs_reset(nic: Nic) -> None:
    nic.tap.peer.send(frame(50))
    nic.rx.add_chain([(b"x" * 32, False), (2048, True)])
    nic.t.notify(RXQ)
    assert nic.t.status & v.STATUS_DEVICE_NEEDS_RESET
    assert nic.t.errors


def test_receive_buffer_smaller_than_header_needs_reset(nic: Nic) -> None:
    nic.tap.peer.send(frame(50))
    post_and_collect(nic, [8])
    assert nic.t.status & v.STATUS_DEVICE_NEEDS_RESET


def test_frame_larger_than_the_ring_is_dropped() -> None:
    x = Nic(queue_size=4)
    x.tap.peer.send(frame(60000))
    x.tap.peer.send(frame(100))
    got = post_and_collect(x, [2048] * 4)  # 8 KiB in the whole ring
    assert stats(x)["rx_no_room"] == 1
    assert len(got) == 1 and got[0][12:] == frame(100)[12:]
    x.close()


def test_vanished_backend_takes_the_link_down(nic: Nic) -> None:
    irqs = nic.irq.count
    nic.tap.peer.close()  # end of file on the device's end
    nic.t.notify(RXQ)
    post_and_collect(nic, [2048])
    assert not nic.dev.link_up
    assert nic.t.read(m.VIRTIO_MMIO_CONFIG + 6, 2) == 0  # status: link down
    assert nic.d.r(m.VIRTIO_MMIO_INTERRUPT_STATUS) & m.VIRTIO_MMIO_INT_CONFIG
    assert nic.irq.count > irqs
    assert stats(nic)["backend_errors"] >= 1
    nic.send([frame(100)])  # transmit still returns buffers
    assert stats(nic)["tx_dropped_link_down"] == 1
    assert nic.t.active


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 66000), min_size=1, max_size=6),
       buffers=st.lists(st.integers(12, 9000), min_size=1, max_size=40),
       mergeable=st.booleans())
def test_receive_property(sizes: list[int], buffers: list[int], mergeable: bool) -> None:
    """Any frames from the tap, any buffer sizes: each frame arrives whole or
    is dropped and counted; nothing outside the posted buffers is written."""
    x = Nic(features=(1 << n.VIRTIO_NET_F_MRG_RXBUF if mergeable else 0) | 1 << n.VIRTIO_NET_F_GUEST_CSUM)
    try:
        sent = []
        for i, size in enumerate(sizes):
            data = frame(max(size - 26, 0), seed=i)[:max(size, 0)] if size >= 26 else os.urandom(size)
            try:
                x.tap.peer.send(data)
            except OSError:
                continue
            sent.append(data)
        heads = [x.rx.add_chain([(size, True)]) for size in buffers]
        spans = {h: x.rx.buffers[h][0][:2] for h in heads}
        after_post = bytes(x.mem.view(0, MEM))
        x.t.notify(RXQ)
        used = x.rx.used()
        after = bytes(x.mem.view(0, MEM))
        # only posted buffers changed (the rings changed too: exclude them)
        allowed = bytearray(MEM)
        for addr, length in spans.values():
            allowed[addr:addr + length] = b"\1" * length
        for lo, hi in ((0x10000, 0x12000), (0x20000, 0x22000)):
            allowed[lo:hi] = b"\1" * (hi - lo)
        diff = [i for i in range(0x100000, MEM, 4096) if after[i:i + 4096] != after_post[i:i + 4096]]
        for page in diff:
            for i in range(page, page + 4096):
                if after[i] != after_post[i]:
                    assert allowed[i], hex(i)
        # reassemble what arrived and check it against what was sent
        frames, current, left = [], b"", 0
        for head, length in used:
            addr, cap = spans[head]
            assert length <= cap
            data = x.mem.read(addr, length)
            if left == 0:
                left = HDR.unpack(data[:12])[6] if len(data) >= 12 else 1
                assert mergeable or left == 1
                current = b""
            current += data
            left -= 1
            if left == 0:
                frames.append(current)
        # Delivered whole, in order; a frame is skipped only if it was dropped and counted.
        good = iter([s[12:] for s in sent if 26 <= len(s) <= n.MAX_FRAME])
        skipped = 0
        for f in frames:
            for g in good:
                if g == f[12:]:
                    break
                skipped += 1
            else:
                raise AssertionError("a frame arrived that was not sent, or out of order")
        assert skipped <= x.dev.counters["rx_no_room"]
        assert x.dev.counters["rx_frames"] == len(frames)
        assert x.t.active
    finally:
        x.close()


# --- receive straight into the guest's buffers ------------------------------------------


def test_receive_reads_straight_into_the_posted_buffers_when_they_hold_the_largest_frame(nic: Nic) -> None:
    sizes = [1536] * 60  # 90 KiB: room for a 64 KiB segment, and one more
    small, big = frame(5000), frame(60000, seed=3)
    nic.tap.peer.send(small)
    nic.tap.peer.send(big)
    got = post_and_collect(nic, sizes)
    assert stats(nic)["rx_frames"] == 2 and not stats(nic).get("rx_copied")  # no frame went through our buffer
    first, second = b"".join(got[:4]), b"".join(got[4:])
    assert HDR.unpack(first[:12])[6] == 4 and first[12:] == small[12:]
    assert HDR.unpack(second[:12])[6] == -(-len(big) // 1536) and second[12:] == big[12:]
    assert len(got) == 4 + -(-len(big) // 1536)
    # What is left (16 buffers, 24 KiB) cannot take a 64 KiB frame: the next one is copied.
    nic.tap.peer.send(frame(100, seed=4))
    nic.t.notify(RXQ)
    assert [length for _, length in nic.rx.used()] == [len(frame(100))]
    assert stats(nic)["rx_copied"] == 1


def test_a_frame_longer_than_the_largest_leaves_the_direct_buffers_for_the_next(nic: Nic) -> None:
    nic.tap.peer.send(b"\0" * (n.MAX_FRAME + 500))
    nic.tap.peer.send(frame(300))
    got = post_and_collect(nic, [1536] * 60)
    assert stats(nic)["rx_oversized"] == 1
    assert len(got) == 1 and got[0][12:] == frame(300)[12:]


def test_the_views_of_stashed_buffers_are_let_go_before_guest_memory_goes(nic: Nic) -> None:
    for _ in range(60):
        nic.rx.add_chain([(1536, True)])
    nic.t.notify(RXQ)  # nothing to read: the device stashes buffers (and views of them) for the next frame
    assert nic.dev.chains_held() == {RXQ: 43}  # 43 * 1536 bytes hold the largest frame and a spare byte
    backing = nic.mem.regions[0].backing
    assert isinstance(backing, bytearray)
    with pytest.raises(BufferError):
        backing.extend(b"x")  # exported: views of it are alive
    nic.t.release_memory()  # Vm.close does this before it unmaps guest memory
    assert nic.dev.chains_held() == {}
    nic.mem.close()
    backing.extend(b"x")  # no view of it is left (the queues' included)
