"""The directory where gunicorn's workers keep their Prometheus values (multiprocess mode).

Used by gunicorn's master through its hooks; it must not import serving.metrics, whose
metrics would otherwise get files of the master's own (a served version of 0 for a pid
that never serves).
"""

from __future__ import annotations

import os
import shutil


def directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def reset() -> None:
    """Empty the directory before the first worker starts: values of an earlier run (a
    restarted container keeping its tmpfs) would add to this run's counters."""
    path = directory()
    if path is None:
        return
    os.makedirs(path, mode=0o700, exist_ok=True)
    for name in os.listdir(path):
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.remove(entry)


def forget_worker(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the totals)."""
    path = directory()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
