"""Writing one gzip member from a stream of writes, deflated block by block on worker threads.

`nifti.save_nifti` hands nibabel a `GzipStream` as its output file: nibabel writes the header and
then the voxel data slice by slice (`Nifti1Image.to_stream`), so the label map is never
serialised into one big bytes object, and no Fortran-ordered copy of a reoriented array is
made (nibabel reads each slice of the view). Every block of at least `BLOCK_BYTES` is deflated
by ISA-L (level `level`) on a thread of this module's pool as soon as it is complete, while the
caller produces the next one; the blocks end in a sync flush (byte-aligned, not final), so their
deflate streams concatenate into one. The CRC-32 of each block is combined in order
(`crc32_combine`), and the member ends with an empty final block and the usual trailer: one
gzip member, as `igzip_threaded` writes it (pigz's scheme), that every gzip reader inflates to
exactly the bytes written. Blocks are deflated independently (no shared dictionary): a label
map's runs of zeros compress just as well.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import struct
import threading
from typing import BinaryIO

from isal import isal_zlib

from livseg_jax.data.slabs import slab_threads

BLOCK_BYTES = 1 << 20  # as igzip_threaded's blocks: many per CT, so every thread gets work
# gzip header: magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as igzip_threaded)
_HEADER = struct.pack("<BBBBIBB", 0x1F, 0x8B, 8, 0, 0, 0, 0xFF)

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (threads, pid): a forked child makes its own


def _deflate_block(block: bytes, level: int) -> tuple[bytes, int, int]:
    """Returns (the raw deflate of `block` ending in a sync flush, its CRC-32, its length)."""
    compressor = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    return compressor.compress(block) + compressor.flush(isal_zlib.Z_SYNC_FLUSH), isal_zlib.crc32(block), len(block)


def _shared_pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    """Returns the module's deflate pool of `threads` workers (made anew when that or the process changes)."""
    global _pool, _pool_key
    with _lock:
        if _pool is None or _pool_key != (threads, os.getpid()):
            _pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="livseg-deflate")
            _pool_key = (threads, os.getpid())
        return _pool


class GzipStream(io.RawIOBase):
    """A write-only, forward-only file object that writes one gzip member to `raw` (see the module).

    `finish()` writes the end of the member; without it (an error while writing) nothing more is
    written and the caller discards the file. `threads` defaults to `slab_threads()`; with 1 the
    blocks are deflated on the calling thread; `block_bytes` defaults to `BLOCK_BYTES`.
    """

    def __init__(self, raw: BinaryIO, level: int, threads: int | None = None,
                 block_bytes: int | None = None):
        super().__init__()
        self._raw = raw
        self._level = level
        self._threads = slab_threads() if threads is None else int(threads)
        self._block_bytes = BLOCK_BYTES if block_bytes is None else int(block_bytes)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._queued: collections.deque = collections.deque()  # futures (or results) in file order
        self._position = 0
        self._crc = 0
        self._length = 0
        self._raw.write(_HEADER)

    def writable(self) -> bool:
        """Returns True: a stream to write to."""
        return True

    def write(self, data) -> int:
        """Returns the number of bytes taken; deflates a block once `block_bytes` are gathered."""
        block = bytes(data)
        self._pending.append(block)
        self._pending_bytes += len(block)
        self._position += len(block)
        if self._pending_bytes >= self._block_bytes:
            self._queue_pending()
        return len(block)

    def tell(self) -> int:
        """Returns the number of uncompressed bytes written so far."""
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        """Returns the position when asked for the current one; OSError for any real seek (nibabel then
        writes zeros up to a data offset)."""
        if whence == 0 and offset == self._position:
            return offset
        raise OSError("a gzip stream cannot seek")

    def flush(self) -> None:
        """Nothing to do: blocks are written in order as they are deflated."""

    def _queue_pending(self) -> None:
        if not self._pending:
            return
        block = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        if self._threads <= 1:
            self._queued.append(_deflate_block(block, self._level))
        else:
            self._queued.append(_shared_pool(self._threads).submit(_deflate_block, block, self._level))
        while len(self._queued) > 2 * self._threads:  # bounds the blocks held in memory
            self._write_oldest()

    def _write_oldest(self) -> None:
        item = self._queued.popleft()
        compressed, crc, length = item.result() if isinstance(item, concurrent.futures.Future) else item
        self._raw.write(compressed)
        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
        self._length += length

    def finish(self) -> None:
        """Writes the remaining blocks, the final empty block and the trailer (CRC-32, length mod 2^32)."""
        self._queue_pending()
        while self._queued:
            self._write_oldest()
        self._raw.write(isal_zlib.compress(b"", wbits=-15))  # an empty final block ends the deflate stream
        self._raw.write(struct.pack("<II", self._crc, self._length & 0xFFFFFFFF))

    def abandon(self) -> None:
        """Waits for the queued blocks without writing them (after an error: the file is discarded)."""
        for item in self._queued:
            if isinstance(item, concurrent.futures.Future):
                item.cancel() or concurrent.futures.wait([item])
        self._queued.clear()
