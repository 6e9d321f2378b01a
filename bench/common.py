"""What the benchmarks share: the command line, the machine description, CPU accounting on
a shared machine, rounds that take turns, per-round ratios, result files and their tables,
and a small HTTP/1.1 load client.

The load client speaks HTTP over raw asyncio streams (uvloop when installed) with
keep-alive connections and pre-built request bytes. A general-purpose client such as
httpx spends several times the server's CPU per request; on a 2-core machine where client
and server share the cores, that would measure the client. Every compared server gets the
same client, so whatever it costs is the same on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
VENV_BIN = Path(sys.executable).parent


# --- the command line ------------------------------------------------------------------


def arguments(doc: str, *, rounds: int | None = None, rounds_help: str = "rounds, the variants taking turns",
              seconds: float | None = None, seconds_help: str = "seconds per phase",
              concurrency: int | None = None, quiet_threshold: float = 0.15, quiet_patience: float = 60,
              cpus: bool = False) -> argparse.ArgumentParser:
    """The flags every benchmark shares, with its own defaults; the benchmark adds the rest.
    The description is the first paragraph of its docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    if seconds is not None:
        parser.add_argument("--seconds", type=float, default=seconds, help=f"{seconds_help} (default {seconds:g})")
    if concurrency is not None:
        parser.add_argument("--concurrency", type=int, default=concurrency,
                            help=f"connections of the load client (default {concurrency})")
    if cpus:
        parser.add_argument("--server-cpus", help="CPU list for the servers, e.g. 0,1 (default: see common.cpu_sets)")
        parser.add_argument("--client-cpus", help="CPU list for the load client (default: see common.cpu_sets)")
    parser.add_argument("--quiet-threshold", type=float, default=quiet_threshold,
                        help=f"before each round, wait until the machine is less busy than this share of its CPUs "
                             f"(default {quiet_threshold:g})")
    parser.add_argument("--quiet-patience", type=float, default=quiet_patience,
                        help=f"seconds to wait for that at most (default {quiet_patience:g})")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                        help="where NAME.json and NAME.md are written (default bench/results)")
    return parser


def chosen_cpus(args: argparse.Namespace) -> tuple[str, str]:
    """(server CPUs, client CPUs): the flags where given, else cpu_sets for this machine."""
    server, client = cpu_sets(os.cpu_count() or 1)
    return getattr(args, "server_cpus", None) or server, getattr(args, "client_cpus", None) or client


def exit_on_signals(*signals: signal.Signals) -> None:
    """Turn these signals into SystemExit, so that a benchmark stopped by them still runs its
    clean-up (servers stopped, containers and temporary files removed)."""
    def stop(signum: int, frame: object) -> None:
        log(f"stopped by {signal.Signals(signum).name}")
        raise SystemExit(128 + signum)

    for one in signals or (signal.SIGTERM,):
        signal.signal(one, stop)


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the machine -----------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def docker_versions() -> dict:
    def ask(*command):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() or None

    return {"docker_engine": ask("docker", "version", "--format", "{{.Server.Version}}"),
            "docker_compose": ask("docker", "compose", "version", "--short")}


def machine(docker: bool = False) -> dict:
    """CPU, cores, memory, OS, package versions and the load average now. Versions come from
    package metadata: importing torch only to print its version would cost seconds."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "gpu": None,  # none of these benchmarks uses one
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in (
            "mlflow", "torch", "numpy", "gunicorn", "uvicorn", "httptools", "uvloop")},
        "load_average_at_start": load_average(),
    }
    if docker:
        info.update(docker_versions())
    return info


def machine_markdown(m: dict) -> str:
    p = m["packages"]
    line = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; {m['os']}; "
            f"Python {m['python']}, mlflow {p['mlflow']}, torch {p['torch']}, gunicorn {p['gunicorn']}, "
            f"uvicorn {p['uvicorn']} (httptools {p['httptools']}, uvloop {p['uvloop']})")
    if m.get("docker_engine"):
        line += f"; Docker {m['docker_engine']}, Compose {m['docker_compose']}"
    end = m.get("load_average_at_end")
    line += f". Load average (1, 5, 15 min) at start {_triple(m['load_average_at_start'])}"
    if end:
        line += f", at end {_triple(end)}"
    return line + "."


def _triple(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


# --- CPU accounting on a shared machine ------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; everything after its ')' is fixed.
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0
    for p in descendants(pid):
        fields = _stat_fields(p)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def container_cpu_seconds(container_id: str) -> float | None:
    """CPU seconds a container's cgroup has used, read on the host (cgroup v1 or v2)."""
    for path, scale in (
        (f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage", 1e-9),
        (f"/sys/fs/cgroup/cpu,cpuacct/docker/{container_id}/cpuacct.usage", 1e-9),
        (f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat", 1e-6),
        (f"/sys/fs/cgroup/docker/{container_id}/cpu.stat", 1e-6),
    ):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith("cpu.stat"):
            for line in text.splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) * scale
            continue
        return int(text) * scale
    return None


class CpuWindow:
    """Measures one span: the machine's busy share, the load average before and after, and
    the CPU seconds of the processes (or containers) that belong to the measurement, so
    that what everything else on the machine used can be reported beside each figure."""

    def __init__(self, pids=(), containers=()):
        self.pids = list(pids)
        self.containers = list(containers)

    def _ours(self) -> float:
        total = own_cpu_seconds() + sum(tree_cpu_seconds(p) for p in self.pids)
        for c in self.containers:
            total += container_cpu_seconds(c) or 0.0
        return total

    def __enter__(self):
        self.load_before = load_average()
        self._jiffies = machine_jiffies()
        self._ours0 = self._ours()
        self._pid_cpu0 = {p: tree_cpu_seconds(p) for p in self.pids}
        self._container_cpu0 = {c: container_cpu_seconds(c) for c in self.containers}
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        busy1, total1 = machine_jiffies()
        busy0, total0 = self._jiffies
        cores = os.cpu_count() or 1
        span = max(total1 - total0, 1)
        self.busy_share = (busy1 - busy0) / span
        ours = self._ours() - self._ours0
        others = max(0.0, (busy1 - busy0) / CLOCK_TICKS - ours)
        # As a share of the whole machine (all cores), like busy_share.
        self.others_share = others / (span / CLOCK_TICKS)
        self.pid_cpu = {p: tree_cpu_seconds(p) - v for p, v in self._pid_cpu0.items()}
        self.container_cpu = {c: (container_cpu_seconds(c) or 0.0) - (v or 0.0)
                              for c, v in self._container_cpu0.items()}
        self.load_after = load_average()
        self.cores = cores
        return False

    def as_dict(self) -> dict:
        return {"seconds": round(self.seconds, 3), "machine_busy_share": round(self.busy_share, 3),
                "others_cpu_share": round(self.others_share, 3),
                "load_before": self.load_before, "load_after": self.load_after}


def wait_until_quiet(threshold: float, patience_s: float) -> float:
    """Wait until the machine is less than `threshold` busy (all processes, as a share of
    all cores), at most `patience_s`; return the share seen last. Other work on the
    machine comes and goes, so a measurement started in a quiet moment is less disturbed."""
    deadline = time.monotonic() + patience_s
    while True:
        busy0, total0 = machine_jiffies()
        time.sleep(2)
        busy1, total1 = machine_jiffies()
        share = (busy1 - busy0) / max(total1 - total0, 1)
        if share < threshold:
            return share
        if time.monotonic() > deadline:
            log(f"machine still {share:.0%} busy after waiting {patience_s:.0f} s; measuring anyway")
            return share


# --- statistics ------------------------------------------------------------------------


def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100), interpolating linearly between the nearest ranks."""
    data = sorted(values)
    if not data:
        return None
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def latency_ms(latencies_s) -> dict:
    values = sorted(latencies_s)
    if not values:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {"count": len(values),
            **{f"p{q}": round(percentile(values, q) * 1000, 3) for q in (50, 90, 99)},
            "max": round(values[-1] * 1000, 3), "mean": round(sum(values) / len(values) * 1000, 3)}


def median(values):
    return percentile(values, 50)


# --- rounds and per-round ratios ----------------------------------------------------------


def rounds(count: int, variants: Sequence[str], quiet_threshold: float, quiet_patience: float
           ) -> Iterator[tuple[int, list[str]]]:
    """(round index, the variants in this round's order) for each round, after a bounded
    wait for a quiet machine. The order rotates, so that no variant always runs first or
    last while other work on the machine comes and goes."""
    names = list(variants)
    for r in range(count):
        share = wait_until_quiet(quiet_threshold, quiet_patience)
        log(f"round {r + 1}/{count} (machine {share:.0%} busy before it)")
        shift = r % len(names)
        yield r, names[shift:] + names[:shift]


def ratio_summary(values: Sequence[float], digits: int = 3) -> dict:
    """The median of per-round ratios, their range and each round's value. Only the two
    sides of one round ran back to back on about the same machine, so ratios are taken
    within a round, never between figures pooled over rounds, and never a best of N."""
    if not values:
        return {"median": None, "range": [None, None], "by_round": []}
    return {"median": round(median(values), digits), "range": [round(min(values), digits), round(max(values), digits)],
            "by_round": [round(v, digits) for v in values]}


def per_round_ratios(runs: Sequence[dict], baseline: Sequence[dict], value: Callable[[dict], float | None]) -> dict:
    """ratio_summary of value(run) / value(baseline run) for the runs of each round; rounds
    where either side has no value (nothing answered) are left out."""
    if len(runs) != len(baseline):
        raise ValueError(f"{len(runs)} runs against {len(baseline)} baseline runs: rounds must pair up")
    ratios = []
    for run, base in zip(runs, baseline, strict=True):
        a, b = value(run), value(base)
        if a is not None and b:
            ratios.append(a / b)
    return ratio_summary(ratios)


def fmt_ratio(summary: dict, spec: str = ".2f") -> str:
    """`1.23x (1.01 to 1.40)`: the median of the per-round ratios, the range in brackets."""
    if summary["median"] is None:
        return "n/a"
    low, high = summary["range"]
    return f"{summary['median']:{spec}}x ({low:{spec}} to {high:{spec}})"


def heading(title: str, report: dict) -> list[str]:
    """A result file's first lines: its title, then when it ran and on what machine."""
    return [f"# {title}", "", f"{report['date']}. {machine_markdown(report['machine'])}", ""]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> list[str]:
    """A markdown table as lines; `align` holds one letter a column, l or r (default: the
    first column left, the others right)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(row) != len(header) for row in rows):
        raise ValueError("every row and the alignment need one entry per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


# --- results ---------------------------------------------------------------------------


def write_results(name: str, report: dict, markdown: str, out_dir: Path = RESULTS_DIR) -> None:
    """bench/results/NAME.json and NAME.md, written whole (through a temporary file, so a
    run stopped halfway never leaves half a result), and the table printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", markdown)):
        target = out_dir / f"{name}{suffix}"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    print(markdown)
    log(f"results written to {out_dir / name}.json and .md")


def fmt(value, spec=",.0f", missing="n/a") -> str:
    return missing if value is None else format(value, spec)


# --- HTTP load --------------------------------------------------------------------------


def http_request(method: str, path: str, host: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    """One HTTP/1.1 request as bytes, built once and sent many times."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HttpConnection:
    """One keep-alive connection; request() sends pre-built bytes and reads one answer."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes):
        """(status, headers with lower-case byte names, body)."""
        if self.writer is None:
            await self.open()
        self.writer.write(data)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.read()
            headers[b"connection"] = b"close"
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body


@dataclass
class LoadResult:
    """Every answer of one load phase: when it ended, how long it took, its status, and the
    value of one chosen header (the model version, for serving)."""

    started: float = 0.0
    finished: float = 0.0
    ends: list = field(default_factory=list)
    latencies: list = field(default_factory=list)
    statuses: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    exceptions: dict = field(default_factory=dict)  # exception type -> count
    error_samples: dict = field(default_factory=dict)  # status -> start of the first such body

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if 200 <= s < 300)

    @property
    def failed(self) -> int:
        return len(self.statuses) - self.ok + sum(self.exceptions.values())

    def failures(self) -> dict:
        out = {}
        for s in self.statuses:
            if not 200 <= s < 300:
                out[f"HTTP {s}"] = out.get(f"HTTP {s}", 0) + 1
        out.update(self.exceptions)
        return out

    def summary(self) -> dict:
        ok_latencies = [t for t, s in zip(self.latencies, self.statuses) if 200 <= s < 300]
        return {"requests": len(self.statuses) + sum(self.exceptions.values()), "ok": self.ok,
                "failed": self.failed, "failures": self.failures(), "seconds": round(self.seconds, 3),
                "requests_per_sec": round(self.ok / self.seconds, 2) if self.seconds > 0 else None,
                "latency_ms": latency_ms(ok_latencies), "error_samples": self.error_samples}


async def drive(host: str, port: int, requests, concurrency: int, duration_s: float,
                max_requests: int | None = None, timeout_s: float = 60.0, tag_header: bytes | None = None,
                stop: asyncio.Event | None = None) -> LoadResult:
    """Closed-loop load: `concurrency` connections, each sending its next request as soon
    as the previous answer is read, until `duration_s` has passed, `max_requests` were
    sent, or `stop` is set. `requests` is a list of request bytes, cycled through, or a
    function (connection index, its request count) -> bytes for requests that must differ
    every time. A failed connection is counted and replaced."""
    make = requests if callable(requests) else (lambda index, n: requests[(index + n) % len(requests)])
    result = LoadResult()
    deadline = time.perf_counter() + duration_s
    sent = 0
    clock = time.perf_counter

    async def worker(index: int):
        nonlocal sent
        conn = HttpConnection(host, port)
        n = 0
        while clock() < deadline and (max_requests is None or sent < max_requests) and not (stop and stop.is_set()):
            sent += 1
            data = make(index, n)
            n += 1
            t0 = clock()
            try:
                async with asyncio.timeout(timeout_s):
                    status, headers, body = await conn.request(data)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as e:
                conn.close()
                name = type(e).__name__
                result.exceptions[name] = result.exceptions.get(name, 0) + 1
                await asyncio.sleep(0.01)  # a refused connection must not become a busy loop
                continue
            t1 = clock()
            result.ends.append(t1)
            result.latencies.append(t1 - t0)
            result.statuses.append(status)
            if not 200 <= status < 300 and status not in result.error_samples:
                result.error_samples[status] = body[:300].decode("utf-8", "replace")
            if tag_header is not None:
                result.tags.append(headers.get(tag_header, b"").decode("latin-1"))
        conn.close()

    result.started = clock()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.finished = clock()
    return result


def run_async(coroutine):
    """asyncio.run on uvloop when installed: the load client's own cost stays small."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def wait_http(url_host: str, port: int, path: str, ok, timeout_s: float, process=None) -> bytes:
    """Poll GET path until ok(status, body) holds; give up after timeout_s or when the
    process being waited for has exited."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{url_host}:{port}{path}", timeout=5) as r:
                body = r.read()
                if ok(r.status, body):
                    return body
                last = f"{r.status} {body[:200]!r}"
        except urllib.error.HTTPError as e:
            last = f"{e.code}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise RuntimeError(f"http://{url_host}:{port}{path} not ready after {timeout_s:.0f} s (last: {last})")


def pin_self(cpus: str) -> None:
    """Pin this process (the load client) to a CPU list such as "0-1" or "2,3"."""
    chosen = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, chosen)


def cpu_sets(cores: int) -> tuple[str, str]:
    """(server CPUs, client CPUs). The serving defaults (2 workers x 1 torch thread) are
    sized for 2 cores; with 4 or more the client gets cores of its own, with fewer every
    process shares the same cores, the client included."""
    if cores >= 4:
        return "0,1", f"2-{cores - 1}"
    all_cores = f"0-{cores - 1}" if cores > 1 else "0"
    return all_cores, all_cores


# --- the served model and local servers (serving and alias-switch benchmarks) -----------------

MODEL_NAME = "bench-fashion-mnist"


def sample_images(count: int, seed: int = 0):
    """float32 [count, 1, 28, 28] in [0, 1]: the trainer's generated FashionMNIST stand-in,
    so requests carry image-like pixels rather than noise or zeros."""
    import numpy as np

    from trainer import synthetic

    rng = np.random.default_rng(seed)
    images, _ = synthetic.make_split(count, synthetic.class_patterns(rng), rng)
    return images[:, None, :, :].astype(np.float32) / 255.0


_SIGNING_KEYS: dict[str, str] = {}


def signing_keys() -> dict[str, str]:
    """One model signing pair per benchmark process, as `make env` writes it (base64 PEMs)."""
    if not _SIGNING_KEYS:
        import base64

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        _SIGNING_KEYS["MODEL_SIGNING_KEY"] = base64.b64encode(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())).decode()
        _SIGNING_KEYS["MODEL_SIGNING_PUBLIC_KEY"] = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    return _SIGNING_KEYS


def build_registry(workdir: Path, names: list[str], versions: int) -> str:
    """A SQLite registry in workdir holding, under each name, versions 1..`versions`: the
    trainer's own export (TorchScript inside the models-from-code pyfunc) of an untrained
    SmallCNN, one seed per version. Training would change the weights, not the cost of
    scoring. `production` points at version 1. Returns the tracking URI."""
    import mlflow
    import numpy as np
    import torch
    from mlflow import MlflowClient

    import model_signatures
    from trainer import architectures, data, export, synthetic

    torch.set_num_threads(1)
    uri = f"sqlite:///{workdir}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    rng = np.random.default_rng(0)
    images, labels = synthetic.make_split(16, synthetic.class_patterns(rng), rng)
    split = data.Split(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    # log_model and model-version sources resolve through MLflow's global tracking URI.
    mlflow.set_tracking_uri(uri)
    key = model_signatures.private_key_from_env(signing_keys())
    for name in names:
        client.create_registered_model(name)
        # Each version is signed for the name it is registered under, as the trainer does.
        for v in range(versions):
            torch.manual_seed(v)
            net = architectures.build("small-cnn").eval()
            with mlflow.start_run(experiment_id=experiment) as run:
                source = export.log_served_model(net, split, "small-cnn", name, key)
            client.create_model_version(name, source=source, run_id=run.info.run_id)
        client.set_registered_model_alias(name, "production", "1")
    return uri


def _server_env(tracking_uri: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SERVING_", "ALIAS_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1",
               MODEL_SIGNING_PUBLIC_KEY=signing_keys()["MODEL_SIGNING_PUBLIC_KEY"], **extra)
    return env


def _pinned(command: list[str], cpus: str | None) -> list[str]:
    import shutil

    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return command


def start_ours(workdir: Path, tracking_uri: str, name: str, port: int, cpus: str | None,
               log_name: str = "ours.log", **settings) -> subprocess.Popen:
    """The serving container's process as its entrypoint runs it (`python -m serving`),
    with its defaults except where `settings` (SERVING_*/ALIAS_* variables) say."""
    env = _server_env(tracking_uri, MODEL_NAME=name, SERVING_CONTAINER_PORT=str(port),
                      SERVING_BIND_HOST="127.0.0.1", SERVING_CACHE_DIR=str(workdir / f"cache-{port}"),
                      **{k: str(v) for k, v in settings.items()})
    out = open(workdir / log_name, "wb")  # noqa: SIM115 - the server writes to it after we return
    # Its own session, so that stopping it stops gunicorn's workers and nothing else.
    return subprocess.Popen(_pinned([sys.executable, "-m", "serving"], cpus), env=env, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def start_mlflow_serve(workdir: Path, tracking_uri: str, model_uri: str, port: int, cpus: str | None,
                       log_name: str = "mlflow-serve.log") -> subprocess.Popen:
    """Plain `mlflow models serve` with its defaults (1 uvicorn worker, torch's own thread
    count); --env-manager local because its default builds a virtualenv from the internet."""
    env = _server_env(tracking_uri)
    out = open(workdir / log_name, "wb")  # noqa: SIM115 - the server writes to it after we return
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-p", str(port)]
    return subprocess.Popen(_pinned(command, cpus), env=env, cwd=workdir, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


def wait_serving(port: int, process, version: str, timeout_s: float = 180) -> None:
    """Until our server answers with `version` on several fresh connections in a row, so
    that every worker (each loads its own copy) has loaded it."""
    import urllib.request

    body = json.dumps({"inputs": sample_images(1).tolist()}).encode()
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < 8:
        if process.poll() is not None:
            raise RuntimeError(f"serving exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"serving on port {port} did not serve version {version} within {timeout_s:.0f} s")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                streak = streak + 1 if r.headers.get("X-Model-Version") == version else 0
        except OSError:
            streak = 0
            time.sleep(0.2)


def start_mlflow_serve_sized(workdir: Path, tracking_uri: str, model_uri: str, port: int, cpus: str | None,
                             workers: int, threads: int, log_name: str) -> subprocess.Popen:
    """Plain `mlflow models serve` with `workers` uvicorn workers and `threads` torch
    threads in each (OMP_NUM_THREADS and MKL_NUM_THREADS, which torch reads when it starts,
    as serving's entry point sets them): the same processes and threads as ours."""
    counts = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env = _server_env(tracking_uri, **counts)
    out = open(workdir / log_name, "wb")  # noqa: SIM115 - the server writes to it after we return
    command = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-p", str(port), "--workers", str(workers)]
    return subprocess.Popen(_pinned(command, cpus), env=env, cwd=workdir, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
