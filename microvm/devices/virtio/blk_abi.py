"""The virtio-blk wire format (virtio 1.2, 5.2): feature bits, request types,
status codes, the config space and request headers, with the limits we
offer. Names follow include/uapi/linux/virtio_blk.h."""

from __future__ import annotations

import ctypes

# Feature bits (5.2.3), names from include/uapi/linux/virtio_blk.h.
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

SECTOR_SIZE = 512  # the protocol's unit, whatever blk_size says (5.2.5)
REQUEST_QUEUE = 0
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data segments; the header and status take two more descriptors
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_WRITE_ZEROES_SECTORS = 1 << 22
DISCARD_SECTOR_ALIGNMENT = 8  # 4 KiB: the host file system's block, so a punched hole frees space


class VirtioBlkConfig(ctypes.LittleEndianStructure):
    """struct virtio_blk_config (5.2.4, include/uapi/linux/virtio_blk.h)::

        le64 capacity;                 /* in 512-byte sectors */
        le32 size_max;  le32 seg_max;
        struct { le16 cylinders; u8 heads; u8 sectors; } geometry;
        le32 blk_size;
        struct { u8 physical_block_exp; u8 alignment_offset; le16 min_io_size; le32 opt_io_size; } topology;
        u8 writeback;  u8 unused0;  le16 num_queues;
        le32 max_discard_sectors;  le32 max_discard_seg;  le32 discard_sector_alignment;
        le32 max_write_zeroes_sectors;  le32 max_write_zeroes_seg;
        u8 write_zeroes_may_unmap;  u8 unused1[3];
        le32 max_secure_erase_sectors;  le32 max_secure_erase_seg;  le32 secure_erase_sector_alignment;
    """

    _pack_ = 1
    _fields_ = [
        ("capacity", ctypes.c_uint64),
        ("size_max", ctypes.c_uint32),
        ("seg_max", ctypes.c_uint32),
        ("cylinders", ctypes.c_uint16),
        ("heads", ctypes.c_uint8),
        ("sectors", ctypes.c_uint8),
        ("blk_size", ctypes.c_uint32),
        ("physical_block_exp", ctypes.c_uint8),
        ("alignment_offset", ctypes.c_uint8),
        ("min_io_size", ctypes.c_uint16),
        ("opt_io_size", ctypes.c_uint32),
        ("writeback", ctypes.c_uint8),
        ("unused0", ctypes.c_uint8),
        ("num_queues", ctypes.c_uint16),
        ("max_discard_sectors", ctypes.c_uint32),
        ("max_discard_seg", ctypes.c_uint32),
        ("discard_sector_alignment", ctypes.c_uint32),
        ("max_write_zeroes_sectors", ctypes.c_uint32),
        ("max_write_zeroes_seg", ctypes.c_uint32),
        ("write_zeroes_may_unmap", ctypes.c_uint8),
        ("unused1", ctypes.c_uint8 * 3),
        ("max_secure_erase_sectors", ctypes.c_uint32),
        ("max_secure_erase_seg", ctypes.c_uint32),
        ("secure_erase_sector_alignment", ctypes.c_uint32),
    ]


class VirtioBlkOuthdr(ctypes.LittleEndianStructure):
    """struct virtio_blk_outhdr { le32 type; le32 reserved (ioprio in Linux); le64 sector; } (5.2.6)"""

    _pack_ = 1
    _fields_ = [("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("sector", ctypes.c_uint64)]


class VirtioBlkDiscardWriteZeroes(ctypes.LittleEndianStructure):
    """struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; } (5.2.6)"""

    _pack_ = 1
    _fields_ = [("sector", ctypes.c_uint64), ("num_sectors", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


HEADER_SIZE = ctypes.sizeof(VirtioBlkOuthdr)
SEGMENT_SIZE = ctypes.sizeof(VirtioBlkDiscardWriteZeroes)
