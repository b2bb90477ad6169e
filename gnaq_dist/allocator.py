"""Keep freed memory in the process for reuse (glibc malloc), instead of one mmap per tensor.

Why: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, so each activation-sized tensor starts
as zero pages that the kernel faults in one by one: costly where a step is short and makes
many of them. With ``M_MMAP_MAX = 0`` large blocks come from the heap and, with a high
``M_TRIM_THRESHOLD``, freed blocks stay there for the next step. The cost: resident memory
no longer falls after a peak, and the heap fragments (a long-lived block above freed ones
pins them; a block of a new size cannot reuse smaller holes), so the peak can grow step
after step. It is applied at the first training step, so that setup's transients do not
fragment the heap. The distributed loop keeps its step's tables (``HaloPlan.step_buffer``),
so with small batches the heap settles and ``retain_freed_memory: null`` turns it on there;
steps of millions of positives (the default schedule at scale) make transients of many
sizes, and there the heap grows step after step, so null leaves it off. The one-process
loop's autograd tensors fragment it, so there it is opt-in. A Ray Train worker also needs
``THREAD_ALLOCATION_ENV`` (below), or its loop's thread does not use this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)
_applied: bool | None = None

# glibc's settings for a process whose tensors come from a thread other than its main one,
# as in a Ray Train worker, which runs the training loop in a thread of its own. glibc gives
# such a thread its own arena, whose heaps are at most 64 MiB and are unmapped when they
# empty: the blocks a step frees (up to the 32 MiB mmap threshold) then come back as fresh
# pages, faulted in one by one, at the next step. In the main arena, with the thresholds
# fixed, they stay in the process and are reused. Read by glibc when the process starts,
# so they go into the workers' environment (``ray_launch.train_on_ray``); the measurements
# are in docs/notes/moved-from-docstrings.md.
THREAD_ALLOCATION_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main arena
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest; fixed, so no block below it is mmapped
    "MALLOC_TRIM_THRESHOLD_": str(_KEEP_UP_TO),  # freed heap top kept (setup's is released explicitly)
}


def worker_allocator_env() -> dict[str, str]:
    """``THREAD_ALLOCATION_ENV`` for a worker's environment; values this process's
    environment sets win, so a user can still choose."""
    return {name: os.environ.get(name, value) for name, value in THREAD_ALLOCATION_ENV.items()}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (None where it cannot be: its functions then count as absent)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Switch glibc malloc to heap-only allocation that keeps freed memory; True if applied.

    Idempotent; a no-op (False) where the C library is not glibc (musl, macOS, Windows).
    Affects the whole process from the next allocation on.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    libc = _libc()
    try:
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: AttributeError elsewhere
    except AttributeError:
        log.info("retain_freed_memory: not glibc, left the allocator as it is")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_UP_TO) == 1
    _applied = bool(ok)
    return _applied


def retaining_freed_memory() -> bool:
    """Whether :func:`retain_freed_memory` has been applied in this process."""
    return bool(_applied)


def release_free_memory() -> None:
    """Give freed memory back to the system: pyarrow's pool (mimalloc or jemalloc keep what
    reading Parquet freed) and glibc's heap (``malloc_trim``). Called after setup, whose
    transients are several times what training keeps (docs/notes/scale-history.md)."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    if _applied:  # the heap is being kept on purpose
        return
    try:
        _libc().malloc_trim(0)
    except AttributeError:
        pass


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_HUGE_MIN_BYTES = 16 << 20  # smaller tables gain nothing worth the alignment slack


@functools.cache
def _libc_madvise():
    """libc's ``madvise`` with its argument types, or None where there is none."""
    fn = getattr(_libc(), "madvise", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def huge_page_table(shape: tuple[int, ...], dtype, device=None):
    """An uninitialised tensor backed by transparent huge pages (2 MiB) where Linux allows it.

    Why: the sparse products read rows of their dense operand at random, so with 4 KiB
    pages nearly every row read misses the TLB; 2 MiB pages cover a 1 GiB table with 512
    entries. A product over a 3 M x 64 table with 60 M non-zeros took 2.56 s against 3.22 s
    (docs/notes/scale-history.md). The kernel's THP mode is usually ``madvise``, so the range must ask
    for it (``MADV_HUGEPAGE``) before it is first touched; the block is over-allocated by
    2 MiB to start on a 2 MiB boundary. Elsewhere (small tables, GPU, no THP) a plain
    ``torch.empty``.
    """
    import torch

    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    device = torch.device("cpu") if device is None else torch.device(device)
    nbytes = math.prod(int(k) for k in shape) * dtype.itemsize
    madvise = _libc_madvise() if device.type == "cpu" and nbytes >= _HUGE_MIN_BYTES else None
    if not madvise:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    addr = raw.data_ptr()
    offset = -addr % _HUGE_PAGE
    madvise(ctypes.c_void_p(addr + offset), nbytes // _HUGE_PAGE * _HUGE_PAGE, _MADV_HUGEPAGE)  # advice only
    return raw[offset: offset + nbytes].view(dtype).view(shape)  # the view keeps ``raw`` alive


__all__ = ["THREAD_ALLOCATION_ENV", "huge_page_table", "release_free_memory", "retain_freed_memory",
           "retaining_freed_memory", "worker_allocator_env"]
