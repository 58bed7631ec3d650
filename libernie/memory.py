"""Process memory as the tools report it."""
from __future__ import annotations


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set (VmHWM), in MB; ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
