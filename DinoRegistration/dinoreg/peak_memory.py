"""Peak resident memory of this process, on Linux, macOS and Windows.

``resource`` exists only on Unix, and ``ru_maxrss`` is in KiB on Linux but in bytes on macOS;
Windows reports the peak working set through ``GetProcessMemoryInfo`` (psapi, via ctypes).
"""

from __future__ import annotations

import sys


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MB (2**20 bytes), or None where it is unknown."""
    try:
        if sys.platform == "win32":
            return _windows_peak_bytes() / 2**20
        import resource  # Unix only

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
    except Exception:  # an unusual platform: the report says "unknown" rather than failing a registration
        return None


def _windows_peak_bytes() -> int:
    import ctypes  # platform-specific: Windows only
    from ctypes import wintypes  # platform-specific: Windows only

    class Counters(ctypes.Structure):
        _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD),
                    ("PeakWorkingSetSize", ctypes.c_size_t), ("WorkingSetSize", ctypes.c_size_t),
                    ("QuotaPeakPagedPoolUsage", ctypes.c_size_t), ("QuotaPagedPoolUsage", ctypes.c_size_t),
                    ("QuotaPeakNonPagedPoolUsage", ctypes.c_size_t), ("QuotaNonPagedPoolUsage", ctypes.c_size_t),
                    ("PagefileUsage", ctypes.c_size_t), ("PeakPagefileUsage", ctypes.c_size_t)]

    counters = Counters()
    counters.cb = ctypes.sizeof(Counters)
    process = ctypes.windll.kernel32.GetCurrentProcess()
    if not ctypes.windll.psapi.GetProcessMemoryInfo(process, ctypes.byref(counters), counters.cb):
        raise OSError("GetProcessMemoryInfo failed")
    return int(counters.PeakWorkingSetSize)
