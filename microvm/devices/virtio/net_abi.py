"""The virtio-net receive header (virtio 1.2, 5.1.6): struct virtio_net_hdr_v1
and the rule for which receive offloads a frame may carry (5.1.6.4), shared
by the device (net.py) and the queues' receive_frames (queue_io.py and the
Cython queue), which read frames from the tap straight into receive buffers.
Names follow include/uapi/linux/virtio_net.h.
"""

from __future__ import annotations

__all__ = [
    "ETH_HLEN",
    "NUM_BUFFERS_OFFSET",
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VNET_HDR_SIZE",
    "gso_accepted",
    "plain_header",
]

# struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers (le16 each). The tap is told the same size
# (backends/tap.py, which devices import and which imports no device).
VNET_HDR_SIZE = 12
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
NUM_BUFFERS_OFFSET = 10  # the last field; everything before it is offload state
ETH_HLEN = 14


def gso_accepted(tso4: bool, tso6: bool, ecn: bool) -> bytes:
    """For each value of a received header's gso_type byte, 1 if a driver that
    negotiated these offloads may be given that frame (5.1.6.4): no segmentation
    (with or without the ECN bit), and TCPv4/TCPv6 segments where GUEST_TSO4/6
    was negotiated, with the ECN bit only under GUEST_ECN."""
    table = bytearray(256)
    table[VIRTIO_NET_HDR_GSO_NONE] = table[VIRTIO_NET_HDR_GSO_NONE | VIRTIO_NET_HDR_GSO_ECN] = 1
    for gso, negotiated in ((VIRTIO_NET_HDR_GSO_TCPV4, tso4), (VIRTIO_NET_HDR_GSO_TCPV6, tso6)):
        if negotiated:
            table[gso] = 1
            table[gso | VIRTIO_NET_HDR_GSO_ECN] = int(ecn)
    return bytes(table)


def plain_header(header: bytes | bytearray | memoryview, accepted: bytes, csum: bool) -> bool:
    """Whether a received frame's header (its first two bytes) is one the driver
    may be given as it is, but for what `csum` says: its gso_type `accepted`
    (gso_accepted), and without GUEST_CSUM (`csum` False) no partial checksum
    (NEEDS_CSUM). Without GUEST_CSUM the device then clears every offload field."""
    return bool(accepted[header[1]]) and (csum or not header[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM)
