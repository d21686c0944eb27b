"""Peak resident memory of the running process, for the benches' fresh-subprocess probes."""

from pathlib import Path


def peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: ru_maxrss carries the parent's
    peak across fork and exec, so a small probe started by a big process would report the parent."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
        / 1024**2
    )
