"""Process-wide settings for heavy CPU work (set once by the ``dynamics`` command and the benchmarks)."""

from __future__ import annotations


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every large tensor (glibc
    ``mallopt``; what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc). Training and gradient passes
    free and reallocate the same tens of megabytes per layer; by default glibc maps blocks over a few MB
    afresh each time and the kernel zero-fills their pages again (a plain SFT step of the default model: 8.3 s
    without these settings, 7.5 s with them, in two separate runs). Blocks up to 32 MB (glibc's ceiling) come from the heap, which is
    never trimmed (-1 reads as the largest size). Returns whether the settings took (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(mallopt(opt, value) == 1 for opt, value in (
        (m_mmap_threshold, 32 * 2**20), (m_trim_threshold, -1), (m_top_pad, 256 * 2**20)))
