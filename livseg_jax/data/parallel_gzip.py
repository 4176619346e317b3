"""Inflating a large `.nii.gz` on many cores with rapidgzip, an optional fast path of `nifti`.

ISA-L (python-isal, a dependency) inflates one gzip stream on one core, 0.61-0.70 s for a
512x512x400 CT on the 16-core GPU host. rapidgzip (`pip install 'livseg_jax[fast-gzip]'`) inflates one
stream in parallel (it finds deflate blocks speculatively and checks every member's CRC32). It is
used by `nifti.read_image` (through `nifti.load_image`) only when all of these hold, else ISA-L
reads the file as before:

- rapidgzip is installed;
- the process may use at least `MIN_THREADS` CPUs (`slabs.slab_threads()`): on the 2-core
  development machine rapidgzip on 2 threads took 0.80 s where ISA-L took 0.29 s for a 56 MB
  512x512x200 CT (`python -m experiments.bench_gzip_inflate`), so it only pays on many cores;
- the file is at least `MIN_BYTES` long (small files inflate in milliseconds either way);
- the result is verified: rapidgzip raised nothing (a CRC32 mismatch raises) and the output's
  length matches the gzip trailer's ISIZE of a one-member file. rapidgzip returns a truncated
  file's first part without an error, so the trailer check is what catches truncation; a file of
  several members, a damaged or truncated one, is then read by ISA-L, which checks every member
  and reports the damage with the file's name, exactly as without this module.

`tests/test_parallel_gzip.py` checks the bytes equal ISA-L's and that damaged files fall back.
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
from typing import Any

import numpy as np

from livseg_jax.data.slabs import slab_threads

MIN_THREADS = 8  # below this ISA-L's one core is as fast (2-core and 16-core runs, docs/benchmarks.md)
MIN_BYTES = 16 << 20
CHUNK_BYTES = 1 << 20  # 0.5-2 MiB measured alike on 16 cores, 4-8 MiB (rapidgzip's default: 4) slower
MAX_DEFLATE_RATIO = 1032  # deflate's largest expansion: 258 bytes from a 2-bit match code


def rapidgzip_module() -> Any | None:
    """Returns the rapidgzip module, or None when it is not installed."""
    try:
        import rapidgzip
    except ImportError:
        return None
    return rapidgzip


def inflate(path: str | os.PathLike, threads: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> memoryview | None:
    """Returns the verified inflated bytes (read-only) of a one-member gzip file read by rapidgzip on
    `threads` threads (default `slab_threads()`), or None when this fast path does not apply (the
    module docstring lists when), so that the caller reads the file with ISA-L.

    The bytes are inflated straight into one buffer of the trailer's length, in `chunk_bytes`
    chunks: on the 16-core GPU host a 512x512x400 CT inflated in 0.28 s this way, against 0.42 s
    through `read()` with rapidgzip's default 4 MiB chunks (`bench_gzip_inflate`, docs/benchmarks.md).
    `BufferStream` reads the result as a file without copying it.
    """
    module = rapidgzip_module()
    threads = slab_threads() if threads is None else threads
    path = pathlib.Path(path)
    if module is None or threads < MIN_THREADS:
        return None
    try:
        size = path.stat().st_size
        if size < max(MIN_BYTES, 18):  # 10-byte header + 8-byte trailer at least
            return None
        with path.open("rb") as f:
            f.seek(size - 4)
            (isize,) = struct.unpack("<I", f.read(4))
        if isize > MAX_DEFLATE_RATIO * size:  # no deflate stream inflates that much: a damaged trailer
            return None
        buffer = np.empty(isize, np.uint8)  # not zeroed: every byte is written below or the result is None
        view, filled = memoryview(buffer), 0
        with module.RapidgzipFile(str(path), parallelization=threads, chunk_size=chunk_bytes) as f:
            while filled < isize and (n := f.readinto(view[filled:])):
                filled += n
            rest = f.read()  # more than ISIZE: a stream of 4 GiB or more (ISIZE is modulo 2**32), or damage
    except (OSError, EOFError, ValueError, RuntimeError, MemoryError):  # CRC mismatch, bad data: ISA-L reports it
        return None
    if filled < isize or (filled + len(rest)) % (1 << 32) != isize:  # truncated, or several members: ISA-L decides
        return None
    if rest:
        buffer = np.concatenate([buffer, np.frombuffer(rest, np.uint8)])
    buffer.flags.writeable = False
    return memoryview(buffer)


class BufferStream(io.RawIOBase):
    """A read-only, seekable binary stream over a buffer; `io.BytesIO` would copy any buffer but `bytes`."""

    def __init__(self, buffer: Any):
        super().__init__()
        self._view = memoryview(buffer).cast("B")
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, b: Any) -> int:
        start = min(self._position, len(self._view))
        part = self._view[start:start + len(memoryview(b).cast("B"))]
        memoryview(b).cast("B")[:len(part)] = part
        self._position = start + len(part)
        return len(part)
