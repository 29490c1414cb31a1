"""The IDX file format (LeCun's MNIST format, also used by Fashion-MNIST).

Layout, all integers big-endian: a 4-byte magic number ``0x00 0x00 <type> <ndim>`` (type 0x08 = unsigned
byte, so images ``[N, rows, cols]`` have magic 2051 = 0x00000803 and labels ``[N]`` have 2049 = 0x00000801),
then ``ndim`` uint32 dimension sizes, then the data in C order. The official files are gzip-compressed.
"""
from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np

from bench.base.errors import UserError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def gunzip(data: bytes, where: str) -> bytes:
    """Decompress a whole gzip file; a truncated or garbled one raises UserError naming ``where``."""
    try:
        z = zlib.decompressobj(wbits=31)  # gzip container; ~2x faster than gzip.decompress for one member
        out = z.decompress(data)
        if not z.eof:
            raise EOFError("the compressed stream ends before its end-of-stream marker")
        return gzip.decompress(data) if z.unused_data else out  # multi-member file: let gzip handle it
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(
            f"{where} is not a complete gzip file ({type(e).__name__}: {e}); it is truncated or corrupt. "
            f"Delete it so it is downloaded again, or replace it with the official file."
        ) from None


def parse_idx(raw: bytes, where: str, magic: int) -> np.ndarray:
    """Parse an (uncompressed) IDX file whose magic number must be ``magic``; returns a writable array."""
    fix = "Delete it so it is downloaded again, or replace it with the official file."
    if len(raw) < 4:
        raise UserError(f"{where} is truncated: {len(raw)} bytes, too short for an IDX header. {fix}")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise UserError(
            f"{where} is not the expected IDX file: magic number {found}, expected {magic} "
            f"({'images' if magic == IMAGES_MAGIC else 'labels'}). {fix}"
        )
    dtype, ndim = _TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{where} is truncated inside its IDX header ({len(raw)} bytes). {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise UserError(
            f"{where} is {state}: the IDX header declares dimensions {list(dims)} ({expected} bytes) but it "
            f"has {len(raw)} bytes. {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).copy()
