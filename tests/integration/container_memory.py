"""The memory a running container holds, as its cgroup counts it (v1 or v2), read from
inside the container so that the host's cgroup layout does not matter.

`anon_bytes` (v2 `anon`, v1 `total_rss`) is the processes' own memory: what grows when
something leaks. `usage_bytes` also counts page cache and tmpfs files (the model cache),
which the kernel fills and reclaims on its own.
"""

from __future__ import annotations

import subprocess
from typing import NamedTuple

MIB = 1024 * 1024


class Memory(NamedTuple):
    usage_bytes: int
    anon_bytes: int

    def __str__(self) -> str:
        return f"{self.anon_bytes / MIB:,.1f} MiB anonymous, {self.usage_bytes / MIB:,.1f} MiB in all"


def _read(container: str, path: str) -> str | None:
    result = subprocess.run(["docker", "exec", container, "cat", path], capture_output=True, text=True, timeout=30)
    return result.stdout if result.returncode == 0 else None


def _stat(text: str) -> dict[str, int]:
    return {key: int(value) for key, _, value in (line.partition(" ") for line in text.splitlines()) if value}


def container_memory(container: str) -> Memory:
    stat = _read(container, "/sys/fs/cgroup/memory.stat")
    if stat is not None:  # cgroup v2
        return Memory(int(_read(container, "/sys/fs/cgroup/memory.current")), _stat(stat)["anon"])
    stat = _read(container, "/sys/fs/cgroup/memory/memory.stat")
    if stat is None:
        raise RuntimeError(f"container {container} shows no cgroup memory files")
    return Memory(int(_read(container, "/sys/fs/cgroup/memory/memory.usage_in_bytes")), _stat(stat)["total_rss"])
