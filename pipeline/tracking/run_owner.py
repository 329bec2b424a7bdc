"""Which process owns an MLflow run, and whether it is gone.

Every run is tagged with its command's process (host, pid and the process's
start time, which tells a pid that was reused apart). A command killed with
SIGKILL (or a lost machine) cannot mark its runs KILLED; the next command on
the same host finds its RUNNING runs whose process is gone and marks them
(pipeline/tracking/client.py). Runs of other hosts are left alone: their processes
cannot be checked from here.
"""
from __future__ import annotations

import os
import socket

OWNER_TAG = "owner_process"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    """`<host>:<pid>:<start time>` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '?'}"


def is_gone(owner: str) -> bool:
    """True when `owner` (this_process() of some process) names a process of this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or started == "?" or not os.path.isdir("/proc"):
        return False
    return _start_time(int(pid)) != started
