"""A long run's process memory: what native allocators keep after the work that needed it is done.

Measured on a whole first run over 1M documents (500 units on the thread runner, peak RSS of the run's
process): pyarrow's default allocator (mimalloc) kept the heaps of the threads each unit's staging ran
on, so the process grew with every unit (about 170MB over the run above what the system allocator
keeps); glibc's allocator in turn keeps what DuckDB frees after a load, in one arena per thread. With
the system allocator for Arrow, two arenas and a trim after each load, the run's memory stays near
where it started. Process-wide on purpose: these are the settings of the process that runs the units.

`set_memory_pool` reaches only what Python asks of Arrow: Arrow's C++ side (Parquet reads, kernels) takes
the allocator named by ARROW_DEFAULT_MEMORY_POOL when libarrow loads, which `core` sets before any entry
point imports pyarrow.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import pyarrow as pa

_M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc():
    """glibc, or None (another C library: nothing to tune)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_memory_flat() -> None:
    """Arrow on the system allocator, glibc limited to two arenas. Called by each run and each unit (a Dask
    worker's process too): after the first call in a process it only reads Arrow's pool, never swaps it again
    while other units' threads allocate from it."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    _limit_arenas()


@functools.cache
def _limit_arenas() -> None:
    if (libc := _libc()) is not None:
        libc.mallopt(_M_ARENA_MAX, 2)


def hand_back_freed() -> None:
    """Return what the allocator holds free to the system (after a load freed its tables)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)
