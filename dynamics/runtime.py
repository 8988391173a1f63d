"""Process-wide settings for heavy CPU work (set once by the ``dynamics`` command and the benchmarks)."""

from __future__ import annotations


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS after every large tensor (glibc
    ``mallopt``; what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc). Training and gradient passes
    free and reallocate the same tensors every step (activations, a head's logits tiles, per-sample gradients);
    by default glibc maps every block over a few MB afresh (over 32 MB it always does) and the kernel faults in and
    zero-fills its pages again: 1.1-1.3 million page faults and 2-3 s of system time per SFT step of the default
    model, twice that with the monitor's 6.3 GiB probe store resident. With every block served from the heap
    (``M_MMAP_MAX`` 0), which is never trimmed, a warm step takes none: a plain SFT step went from 7.9-8.6 s to
    6.8-7.0 s (two separate processes, one before the change and one after, so noisy; the monitor's gain,
    measured in one process, is in benchmarks/RESULTS.md). The cost: the process keeps its
    peak heap until it exits. Returns whether the settings took (False off glibc)."""
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
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    return all(mallopt(opt, value) == 1 for opt, value in (
        (m_mmap_max, 0), (m_trim_threshold, -1), (m_top_pad, 256 * 2**20)))
