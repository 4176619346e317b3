"""Fast gzip for volume files: multi-threaded multi-member compression, whole-buffer decompression.

Writing: the raw bytes are cut into chunks (`DEFAULT_CHUNK_SIZE`), each chunk is compressed to a
complete gzip member by `zlib.compressobj(level, DEFLATED, 31)` in a thread pool (zlib releases the
GIL, so chunks compress on all cores), and the members are written one after another. A sequence of
members is a valid gzip file (RFC 1952 section 2.2): Python's `gzip`, `gunzip`, nibabel (tested) and
zlib's `gzread` (documented; niftilib-based tools) read it as the concatenation of the chunks. Each
member's header carries an extra field (RFC 1952 2.3.1.1, subfield id "LJ", 8-byte little-endian
member length), as BGZF does, so a reader can find all members without inflating and decompress them
in parallel; readers that do not know the subfield skip it.

Reading: the file is read once and inflated from memory by `zlib.decompressobj(31)`, member after
member (no `gzip.GzipFile` streaming). When every member carries the length field (files written
here) the members are inflated in parallel; other files (one member, as nibabel and ITK write them,
or members without the field) are inflated sequentially, in bounded pieces. zlib checks every
member's CRC-32 and length. Bytes after the last member that do not start a new member are ignored,
as `gunzip` does. `PartsReader` lets a parser read the pieces as one file without joining them.

Compression level: `DEFAULT_LEVEL` = 1, the level nibabel writes by default. On CT (int16 HU with
noise) higher levels gain almost nothing (ratio 1.96 at level 1, 2.02 at 3, 1.98 at 6 on a synthetic
512 x 512 x 400 volume) at 1.8-6x the time; label maps compress 190x at level 1 already.

Errors: a stream that is not gzip, is truncated or is corrupt raises `GzipDataError` (an `OSError`,
like `gzip.BadGzipFile`) whose message starts with the file's name.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import io
import itertools
import os
import pathlib
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

DEFAULT_LEVEL = 1
DEFAULT_CHUNK_SIZE = 4 << 20  # 4 MiB: ~25 members per 100 MB, enough to balance 16 threads
MAX_CHUNK_SIZE = 1 << 30
_MAGIC = b"\x1f\x8b"
_FEXTRA = 0x04
_SUBFIELD_ID = b"LJ"  # livseg_jax: payload is the member's total length in bytes, uint64 LE
_EXTRA_FIELD_LEN = 4 + 8  # SI1 SI2 LEN(2) + payload
# Sequential inflate feeds this much compressed input per call and takes at most this much output
# per call: pieces of bounded size, no large temporary buffers inside zlib.
_INPUT_STEP = 256 << 10
_OUTPUT_STEP = 4 << 20
# Anything with the buffer protocol: bytes, bytearray, memoryview, contiguous numpy arrays.
Buffer = Any


class GzipDataError(OSError):
    """A gzip stream is not gzip, truncated or corrupt; the message starts with the file's name.

    `detail` is the message without the name, `truncated` is True when the data ended inside a
    member, `n_decompressed` counts the bytes inflated before the problem (at least).
    """

    def __init__(self, name: str, detail: str, *, truncated: bool = False, n_decompressed: int = 0):
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail
        self.truncated = truncated
        self.n_decompressed = n_decompressed

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):  # picklable across worker processes despite the keyword-only fields
        return (
            _rebuild_error,
            (type(self), self.name, self.detail, self.truncated, self.n_decompressed),
        )


def _rebuild_error(cls: type[GzipDataError], name: str, detail: str, truncated: bool, n: int) -> GzipDataError:
    return cls(name, detail, truncated=truncated, n_decompressed=n)


def default_threads() -> int:
    """Returns the number of CPUs this process may run on (affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _byte_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("data must be a C-contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _compress_member(chunk: memoryview, level: int) -> tuple[bytes, memoryview]:
    """Returns one gzip member for `chunk` as (header with our length field, rest of the member)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)
    body = comp.compress(chunk) + comp.flush()
    if body[:4] != b"\x1f\x8b\x08\x00":  # zlib writes a 10-byte header without optional fields
        raise RuntimeError(f"unexpected gzip header from zlib: {body[:10].hex()}")
    total = len(body) + 2 + _EXTRA_FIELD_LEN
    header = (
        body[:3]
        + bytes([_FEXTRA])
        + body[4:10]
        + struct.pack("<H", _EXTRA_FIELD_LEN)
        + _SUBFIELD_ID
        + struct.pack("<HQ", 8, total)
    )
    return header, memoryview(body)[10:]


def compress_iter(
    data: Buffer,
    level: int = DEFAULT_LEVEL,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
) -> Iterator[bytes | memoryview]:
    """Yields the pieces of a multi-member gzip stream of `data`, in order, compressing in threads.

    `threads` None uses `default_threads()`; 1 compresses in the calling thread. Empty input gives
    one empty member (a valid gzip file that decompresses to b"").
    """
    if not 0 <= level <= 9:
        raise ValueError(f"compression level must be 0..9, got {level}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}, got {chunk_size}")
    view = _byte_view(data)
    chunks = [view[i : i + chunk_size] for i in range(0, len(view), chunk_size)] or [view[0:0]]
    threads = default_threads() if threads is None else max(1, int(threads))
    threads = min(threads, len(chunks))

    if threads == 1:
        for chunk in chunks:
            yield from _compress_member(chunk, level)
        return
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gzip") as pool:
        # Submit a bounded window ahead of the consumer so memory stays ~2 * threads chunks.
        futures: list[concurrent.futures.Future] = []
        next_chunk = 0
        window = 2 * threads
        try:
            while next_chunk < len(chunks) or futures:
                while next_chunk < len(chunks) and len(futures) < window:
                    futures.append(pool.submit(_compress_member, chunks[next_chunk], level))
                    next_chunk += 1
                yield from futures.pop(0).result()
        finally:
            for f in futures:
                f.cancel()


def compress(
    data: Buffer, level: int = DEFAULT_LEVEL, chunk_size: int = DEFAULT_CHUNK_SIZE, threads: int | None = None
) -> bytes:
    """Returns `data` as a multi-member gzip stream (see `compress_iter`)."""
    return b"".join(compress_iter(data, level, chunk_size, threads))


def write_file(
    path: str | os.PathLike,
    data: Buffer,
    level: int = DEFAULT_LEVEL,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
) -> pathlib.Path:
    """Returns `path` after writing `data` gzip-compressed to it (not atomic: callers rename)."""
    path = pathlib.Path(path)
    with open(path, "wb") as f:
        for piece in compress_iter(data, level, chunk_size, threads):
            f.write(piece)
    return path


def _recorded_member_length(view: memoryview, pos: int) -> int | None:
    """Returns the member length from our extra subfield of the gzip header at `pos`, else None."""
    if bytes(view[pos : pos + 3]) != b"\x1f\x8b\x08" or len(view) < pos + 12 or not view[pos + 3] & _FEXTRA:
        return None
    (xlen,) = struct.unpack_from("<H", view, pos + 10)
    p, extra_end = pos + 12, pos + 12 + xlen
    if extra_end > len(view):
        return None
    while p + 4 <= extra_end:
        (sub_len,) = struct.unpack_from("<H", view, p + 2)
        if bytes(view[p : p + 2]) == _SUBFIELD_ID and sub_len == 8 and p + 12 <= extra_end:
            return struct.unpack_from("<Q", view, p + 4)[0]
        p += 4 + sub_len
    return None


def _locate_members(view: memoryview) -> list[tuple[int, int]] | None:
    """Returns [(offset, length)] of every member when all carry our length field, else None."""
    members = []
    pos = 0
    n = len(view)
    while pos < n:
        member_len = _recorded_member_length(view, pos)
        if member_len is None or member_len < 18:
            return None  # not a chain of our members (or trailing bytes): the sequential path decides
        members.append((pos, member_len))
        pos += member_len
    return members or None


def _inflate_member(view: memoryview, offset: int, length: int) -> bytes:
    """Returns the data of one member; raises zlib.error or EOFError (member cut short)."""
    member = view[offset : offset + length]
    d = zlib.decompressobj(31)
    out = d.decompress(member)
    if not d.eof:
        raise EOFError("compressed data ends before the end of the gzip member")
    if d.unused_data:
        raise zlib.error("gzip member is shorter than its recorded length")
    return out


def _decompress_sequential(view: memoryview, name: str) -> list[bytes]:
    parts: list[bytes] = []
    n_out = 0
    pos = 0
    n = len(view)
    member = 0
    while pos < n:
        if bytes(view[pos : pos + 2]) != _MAGIC:
            if member == 0:
                raise GzipDataError(name, f"not a gzip file (starts with {bytes(view[:4]).hex()})")
            break  # trailing bytes that do not start a member: ignored, as gunzip does
        d = zlib.decompressobj(31)
        start = pos
        pending: bytes | memoryview = b""
        while not d.eof:
            if not pending:
                if pos >= n:
                    raise GzipDataError(
                        name,
                        f"gzip data is truncated (ends inside member {member} at byte {n}, "
                        f"after {n_out} decompressed bytes)",
                        truncated=True,
                        n_decompressed=n_out,
                    )
                pending = view[pos : pos + _INPUT_STEP]
                pos += len(pending)
            try:
                out = d.decompress(pending, _OUTPUT_STEP)
            except zlib.error as e:
                raise GzipDataError(
                    name,
                    f"corrupt gzip data in member {member} (starting at byte {start}): {e}",
                    n_decompressed=n_out,
                ) from e
            pending = d.unconsumed_tail
            parts.append(out)
            n_out += len(out)
        pos -= len(d.unused_data)  # input fed after the end of this member
        member += 1
    return parts


def decompress_parts(data: Buffer, threads: int | None = None, name: str = "<gzip data>") -> list[bytes]:
    """Returns the decompressed data of all gzip members in `data` as consecutive pieces.

    Members written by `compress` are inflated in `threads` threads (None: `default_threads()`);
    any other gzip stream is inflated sequentially. The parallel path is only a shortcut: if it
    fails (damaged data or lengths that do not match the members), the sequential path decides
    between the data and the exact error. Raises GzipDataError naming `name`.
    """
    view = _byte_view(data)
    threads = default_threads() if threads is None else max(1, int(threads))
    members = _locate_members(view) if threads > 1 else None
    if members is None or len(members) < 2 or members[-1][0] + members[-1][1] != len(view):
        return _decompress_sequential(view, name)
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(members)), thread_name_prefix="gunzip") as pool:
        futures = [pool.submit(_inflate_member, view, off, length) for off, length in members]
        try:
            parts = [f.result() for f in futures]
        except (zlib.error, EOFError):
            for f in futures:
                f.cancel()
            parts = None
    if parts is None:
        return _decompress_sequential(view, name)
    return parts


def decompress(data: Buffer, threads: int | None = None, name: str = "<gzip data>") -> bytes:
    """Returns the concatenated data of all gzip members in `data` (see `decompress_parts`)."""
    return b"".join(decompress_parts(data, threads, name))


def read_file(path: str | os.PathLike, threads: int | None = None) -> bytes:
    """Returns the decompressed contents of the gzip file `path` (errors name the file)."""
    return b"".join(read_file_parts(path, threads))


def read_file_parts(path: str | os.PathLike, threads: int | None = None) -> list[bytes]:
    """Returns the decompressed contents of the gzip file `path` as pieces (errors name the file)."""
    path = pathlib.Path(path)
    return decompress_parts(path.read_bytes(), threads=threads, name=str(path))


class PartsReader(io.RawIOBase):
    """A read-only, seekable binary file over consecutive byte pieces, without joining them.

    Lets a parser (nibabel's `from_stream`) read decompressed data in place: `readinto` copies
    straight from the pieces into the caller's buffer, so the data is copied once, not twice.
    """

    def __init__(self, parts: Sequence[bytes]):
        super().__init__()
        self._parts = [memoryview(p).cast("B") for p in parts if len(p)]
        self._starts = list(itertools.accumulate((len(p) for p in self._parts), initial=0))
        self._size = self._starts[-1]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Buffer) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        i = max(0, bisect.bisect_right(self._starts, self._pos) - 1)
        while done < len(out) and i < len(self._parts):
            offset = self._pos - self._starts[i]
            if offset < len(self._parts[i]):
                n = min(len(self._parts[i]) - offset, len(out) - done)
                out[done : done + n] = self._parts[i][offset : offset + n]
                done += n
                self._pos += n
            i += 1
        return done


def member_sizes(data: Buffer) -> Sequence[int] | None:
    """Returns the compressed sizes of the members of a stream written by `compress`, else None."""
    members = _locate_members(_byte_view(data))
    return None if members is None else [length for _, length in members]
