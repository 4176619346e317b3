"""Peak memory of a prediction: the process's resident set on the host, and the device's allocator.

Host: Linux's high-water mark of the resident set (`VmHWM` in /proc/self/status), which
`reset_host_peak` sets back to the current size (writing 5 to /proc/self/clear_refs), so that a
run predicting one case at a time measures each case's own peak. Where /proc is missing, the
process's lifetime peak from `resource.getrusage` is reported instead and the record says so.
Device: `jax.Device.memory_stats()["peak_bytes_in_use"]` (GPUs and TPUs; XLA:CPU reports
nothing, then None). JAX cannot reset it: it is the process's peak on that device so far.
"""

from __future__ import annotations

import pathlib
import resource
import sys
from typing import Any

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")
GIB = 1 << 30


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def host_peak_bytes() -> tuple[int, str]:
    """Returns (the host's peak resident set in bytes, what it covers: "since reset" or "process")."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak, "since reset"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024), "process"


def reset_host_peak() -> bool:
    """Returns whether the host high-water mark could be reset to the current resident set."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def device_peak_bytes(device: Any) -> int | None:
    """Returns the device allocator's peak bytes in use so far, or None where the backend reports none."""
    if device is None:
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise various errors
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def memory_record(device: Any = None, host_scope: str = "since reset") -> dict[str, Any]:
    """Returns the JSON record of peak host and device memory in GiB (None where unknown).

    `host_scope` says what the caller's last `reset_host_peak` covers (e.g. "this case").
    """
    host, scope = host_peak_bytes()
    scope = host_scope if scope == "since reset" else scope
    current = _status_bytes("VmRSS")
    device_peak = device_peak_bytes(device)
    return {"host_peak_rss_gib": round(host / GIB, 3), "host_peak_scope": scope,
            "host_rss_now_gib": None if current is None else round(current / GIB, 3),
            "device_peak_gib": None if device_peak is None else round(device_peak / GIB, 3),
            "device_peak_scope": "process"}
