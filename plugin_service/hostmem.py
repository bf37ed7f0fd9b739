"""Host-memory policy of glibc's allocator, switched per engine call.

Why: PGD allocates the same activations at every step. glibc serves blocks above its mmap
threshold (dynamic, capped at 32 MiB) with a fresh ``mmap`` and returns them with ``munmap``, so
every step page-faults and zeroes them again. At batch 32 the 160x160 activations of the default
shadow are 52 MB each: about 200,000 minor page faults per step, which is why a batch of 32 was
slower per face than a batch of 8 (whose blocks stay under the threshold and are reused). Raising
the threshold and disabling trimming keeps freed blocks in the heap; one arena keeps the engine's
worker threads on that heap. The price: the process keeps its peak resident memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_REUSE = {_M_ARENA_MAX: 1, _M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1}
# glibc's steady state with default settings: the dynamic threshold has risen to its 32 MiB cap.
_DEFAULT = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}

_lock = threading.Lock()
_state: dict[str, object] = {"libc": None, "current": None, "warned": False}


def _mallopt() -> ctypes.CDLL | None:
    if _state["libc"] is None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        _state["libc"] = libc if libc is not None and hasattr(libc, "mallopt") else False
    return _state["libc"] or None  # type: ignore[return-value]


def set_reuse(reuse: bool) -> bool:
    """Keeps (True) or returns (False) freed large blocks; True if the policy is in effect (glibc present)."""
    with _lock:
        if _state["current"] == reuse:
            return True
        libc = _mallopt()
        if libc is None:
            if not _state["warned"]:
                log.info("host memory reuse unavailable (no glibc mallopt); large tensors are mapped per step")
                _state["warned"] = True
            return False
        ok = all(libc.mallopt(option, value) == 1 for option, value in (_REUSE if reuse else _DEFAULT).items())
        _state["current"] = reuse
        return ok
