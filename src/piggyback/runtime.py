"""Process-wide speed settings for the command line (the library never changes them itself)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc only); returns whether it was applied.

    Why: each CPU training step allocates and frees hundreds of MB of activations. glibc hands
    large blocks back to the kernel (mmap/munmap), so every step page-faults them in again, zeroed.
    Measured on EfficientNet-Lite0, batch 32 at 128 px, 2 cores: 116k page faults and ~0.2 s of
    system time per step before, ~1k and ~0 after, and the step 1.07x faster. jemalloc or tcmalloc
    would do the same through LD_PRELOAD; mallopt needs no extra install. Memory is then returned
    to the system only when the process exits, which suits a training or evaluation command, and
    a server (`piggyback serve`, its Ray replicas) whose peak is its working size anyway.

    One arena for every thread, too: a server runs the network in a worker thread, and glibc
    gives other threads arenas of at most 64 MiB that serve a larger block by mmap whatever the
    settings above (then unmap it on free). A batch of 32 Lite0 images at 128 px has a 50 MB
    activation: 396 page faults per image and the batch ~25% slower in a worker thread than in
    the main thread, measured; none and as fast with one arena. This only holds while no thread
    arena exists yet: glibc hands a new thread an existing arena, one left by an exited thread
    included, so call it first thing, before any thread has run (the `piggyback` command does;
    processes started by others, e.g. Ray workers, get `MALLOC_ARENA_MAX=1` in their
    environment instead). Not measured: lock contention on the one arena with many threads
    allocating large blocks at once (training's intra-op threads allocate little).
    """
    mallopt = _glibc_function("mallopt")
    if mallopt is None:  # not glibc (e.g. musl): leave the allocator alone
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all([bool(mallopt(option, value)) for option, value in settings])  # a list: apply all


def release_free_memory() -> bool:
    """Hand memory freed inside the process back to the system (glibc's malloc_trim); returns
    whether anything was released.

    With `tune_allocator`, a server keeps its peak for good: after a few 9-megapixel uploads
    decoded at once it held ~1 GB more than its working size. Called after such a rare large
    image, this costs ~12 ms (a 9-megapixel PNG takes ~320 ms to decode) and gives it back.
    """
    trim = _glibc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


@functools.cache  # find_library runs ldconfig in a subprocess: once per process, not per call
def _glibc_function(name: str):
    """A function of glibc through ctypes, or None on another platform or C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
