"""What a stage cost, measured around its run: peak resident memory per process and disk.

Peak RSS is the kernel's high-water mark (VmHWM in /proc/<pid>/status) of the driver and
every process below it (the local Ray instance's workers, Ray Train's workers), reset at
the stage's start by writing 5 to /proc/<pid>/clear_refs, so each stage gets its own
peak. Workers of a Ray cluster on other machines are not seen: there the figure is the
driver's and this node's. Where /proc is missing (not Linux) the figure is None.
"""
from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_RESET_PEAK = b"5"  # proc(5), clear_refs: "reset the peak resident set size"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = _PROC / str(pid) / "task"
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def process_tree(root: int | None = None) -> list[int]:
    """`root` (default: this process) and all its descendants."""
    todo, seen = [root or os.getpid()], []
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def reset_peaks(pids: list[int] | None = None) -> None:
    """Reset the peak RSS of this process tree (a stage's start)."""
    for pid in pids or process_tree():
        try:
            (_PROC / str(pid) / "clear_refs").write_bytes(_RESET_PEAK)
        except OSError:
            continue  # gone meanwhile, or not ours


def _peak_rss(pid: int) -> int | None:
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes(pids: list[int] | None = None) -> int | None:
    """The largest peak RSS of one process in this process tree since the last reset."""
    peaks = [p for p in (_peak_rss(pid) for pid in (pids or process_tree())) if p is not None]
    return max(peaks) if peaks else None


def disk_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (what a stage's output holds)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
