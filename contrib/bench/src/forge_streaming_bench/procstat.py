"""CPU time and memory of a process, read from /proc (no psutil needed).

CPU per delivery is the server's utime+stime delta over a burst divided by
the deliveries the clients counted, so these two readings are the core of
every CPU figure in the report.
"""

from __future__ import annotations

import os
import resource

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, all its live threads, in nanosecond resolution.

    /proc/PID/task/*/schedstat counts run time in ns; /proc/PID/stat counts
    10 ms ticks, too coarse for a sub-second burst, so it is only the fallback.
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return stat_cpu_seconds(pid)


def stat_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` from /proc/PID/stat (10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def self_cpu_seconds() -> float:
    """User + system CPU seconds of the calling process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return (soft, hard).

    Children inherit the limit, so calling this in the harness before
    starting servers and load generators covers every process. Raising the
    hard limit itself needs privileges (``ulimit -Hn``, ``LimitNOFILE=`` in
    systemd, or CAP_SYS_RESOURCE); the report states the limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)
