"""Inflating a large `.nii.gz` on many cores with rapidgzip, an optional fast path of `nifti`.

ISA-L (python-isal, a dependency) inflates one gzip stream on one core, about 0.45 s for a
512x512x400 CT on the GPU host. rapidgzip (`pip install 'livseg_jax[fast-gzip]'`) inflates one
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

import os
import pathlib
import struct
from typing import Any

from livseg_jax.data.slabs import slab_threads

MIN_THREADS = 8  # below this ISA-L's one core is as fast (2-core measurement; 16-core run pending)
MIN_BYTES = 16 << 20


def rapidgzip_module() -> Any | None:
    """Returns the rapidgzip module, or None when it is not installed."""
    try:
        import rapidgzip
    except ImportError:
        return None
    return rapidgzip


def inflate(path: str | os.PathLike, threads: int | None = None) -> bytes | None:
    """Returns the verified inflated bytes of a one-member gzip file read by rapidgzip on `threads`
    threads (default `slab_threads()`), or None when this fast path does not apply (the module
    docstring lists when), so that the caller reads the file with ISA-L."""
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
        with module.open(str(path), parallelization=threads) as f:
            raw = f.read()
    except (OSError, EOFError, ValueError, RuntimeError):  # CRC mismatch, bad data: ISA-L reports it
        return None
    if len(raw) % (1 << 32) != isize:  # truncated, or several members: ISA-L decides
        return None
    return raw
