"""virtio-vsock's wire format (virtio 1.2, section 5.10), from include/uapi/linux/virtio_vsock.h.

Defined once here for the device (vsock.py) and its connections (vsock_muxer.py).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

HOST_CID = 2  # VMADDR_CID_HOST
MAX_GUEST_CID = 0xFFFF_FFFE  # 0xFFFFFFFF is VMADDR_CID_ANY; 0, 1, 2 are reserved (5.10.4)

VIRTIO_VSOCK_F_SEQPACKET = 1  # not offered: stream sockets only
VIRTIO_VSOCK_TYPE_STREAM = 1

VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

VIRTIO_VSOCK_SHUTDOWN_RCV = 1  # the sender will receive no more
VIRTIO_VSOCK_SHUTDOWN_SEND = 2  # the sender will send no more

VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
EVENT_SIZE = 4  # struct virtio_vsock_event { le32 id; }

MAX_PKT_PAYLOAD = 64 * 1024  # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE (include/linux/virtio_vsock.h)


class VsockHdr(NamedTuple):
    """struct virtio_vsock_hdr, packed, little-endian:
    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len; le16 type;
    le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;"""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return _HDR.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> VsockHdr:
        return cls(*_HDR.unpack(data))


_HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = _HDR.size  # 44
