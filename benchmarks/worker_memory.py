"""Peak RSS for the peer workers, which run in their own virtual environments without edge_sel: Linux's VmHWM,
else ``ru_maxrss`` (bytes on macOS, KiB elsewhere). Imported from the worker scripts' own folder."""

import sys


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
