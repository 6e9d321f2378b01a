"""Server CPU per `runs/log-batch` call: the stack's tracking app (basic auth behind the
guard and the body limit) against plain `mlflow server`, both local, one uvicorn worker each,
on SQLite files in a temporary directory; no Docker.

Each round starts both servers (taking turns), warms them up (the first call of a user pays
one password check), then sends a fixed number of log-batch calls with 10 metrics each from
a few threads, as a non-admin user with EDIT on the experiment (ours) or anonymously (plain).
Server CPU is utime + stime of the server's process tree from /proc before and after the
calls; stored metric rows are counted in the tracking database afterwards.

`--profile` runs ours once more under cProfile (every thread of the worker) and prints the
functions that cost most, for finding where the CPU goes.

    python -m bench.auth_profile [--rounds 3] [--requests 400] [--threads 4] [--profile]
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import common

METRICS_PER_REQUEST = 10
ADMIN, ADMIN_PASSWORD = "admin", "admin-password-for-the-bench"
USER, USER_PASSWORD = "alice", "alice-password-for-the-bench"

# Loaded into the profiled server through PYTHONPATH: a cProfile per thread, merged at exit.
_SITECUSTOMIZE = '''
import cProfile, os, signal, sys, threading

def _install():
    profiles = []

    def start(*_):
        sys.setprofile(None)
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    def dump():
        import pstats
        for profile in profiles:
            profile.create_stats()
        target = os.path.join(os.environ["AUTH_PROFILE_DIR"], f"worker-{os.getpid()}.prof")
        pstats.Stats(*profiles).dump_stats(target + ".tmp")
        os.replace(target + ".tmp", target)

    threading.setprofile(start)
    start()
    signal.signal(signal.SIGUSR1, lambda *_: dump())

if b"uvicorn" in open("/proc/self/cmdline", "rb").read():
    _install()
'''


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _call(port: int, path: str, body: dict, auth: str | None, version: int = 2) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    conn.request("POST", f"/api/{version}.0/mlflow/{path}", json.dumps(body).encode(), headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status} {data[:300]!r}")
    return json.loads(data or b"{}")


def start(variant: str, workdir: Path, port: int, profile_dir: Path | None = None) -> subprocess.Popen:
    tracking = f"sqlite:///{workdir / f'{variant}-tracking.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(common.ROOT), PYTHONUNBUFFERED="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PATH=f"{common.VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(common.VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", tracking,
               "--default-artifact-root", str(workdir / f"{variant}-artifacts")]
    if variant == "ours":
        ini = workdir / "auth.ini"
        from tracking import start_server

        ini.write_text(start_server.auth_config_text(f"sqlite:///{workdir / 'auth.db'}", 30))
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="bench-secret",
                   MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
                   MLFLOW_CREATORS="trainer", MLFLOW_MAX_BODY_BYTES=str(512 * 1024**2),
                   MLFLOW_SERVER_ENABLE_GRAPHQL_AUTH="true")
        command[2:2] = ["--app-name", "stack-basic-auth"]
    if profile_dir is not None:
        (profile_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        env.update(PYTHONPATH=f"{profile_dir}{os.pathsep}{common.ROOT}", AUTH_PROFILE_DIR=str(profile_dir))
    log = open(workdir / f"{variant}.log", "ab")  # noqa: SIM115 - the server writes to it after we return
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    common.wait_http("127.0.0.1", port, "/health", lambda status, body: status == 200, 180, process)
    return process


def prepare(variant: str, port: int, threads: int) -> tuple[list[str], str | None]:
    """The runs to log to (one a thread) and the Authorization header to log with."""
    admin = _basic(ADMIN, ADMIN_PASSWORD) if variant == "ours" else None
    experiment = _call(port, "experiments/create", {"name": f"bench-{time.time_ns()}"}, admin)["experiment_id"]
    auth = None
    if variant == "ours":
        try:
            _call(port, "users/create", {"username": USER, "password": USER_PASSWORD}, admin)
        except RuntimeError as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        auth = _basic(USER, USER_PASSWORD)
        grant = {"username": USER, "resource_type": "experiment", "resource_id": experiment}
        runs = [_call(port, "runs/create", {"experiment_id": experiment}, admin)["run"]["info"]["run_id"]
                for _ in range(threads)]
        # The caches must not outlive a grant: refused before it, allowed with it, refused
        # again on the very next call after it is revoked.
        expect_status(port, runs[0], auth, 403)
        _call(port, "users/permissions/grant", {**grant, "permission": "EDIT"}, admin, version=3)
        expect_status(port, runs[0], auth, 200)
        _call(port, "users/permissions/revoke", grant, admin, version=3)
        expect_status(port, runs[0], auth, 403)
        _call(port, "users/permissions/grant", {**grant, "permission": "EDIT"}, admin, version=3)
        return runs, auth
    runs = [_call(port, "runs/create", {"experiment_id": experiment}, None)["run"]["info"]["run_id"]
            for _ in range(threads)]
    return runs, auth


def expect_status(port: int, run_id: str, auth: str, status: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    metric = {"key": "probe", "value": 1.0, "timestamp": int(time.time() * 1000), "step": 0}
    conn.request("POST", "/api/2.0/mlflow/runs/log-batch", json.dumps({"run_id": run_id, "metrics": [metric]}),
                 {"Content-Type": "application/json", "Authorization": auth})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != status:
        raise RuntimeError(f"log-batch answered {response.status}, expected {status}: {body[:300]!r}")


def load(port: int, runs: list[str], auth: str | None, requests: int) -> tuple[int, int, float]:
    """(answered 200, errors, seconds): `requests` log-batch calls spread over one keep-alive
    connection per run."""
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for step in range(index, requests, len(runs)):
            metrics = [{"key": f"m{k}", "value": k / 10, "timestamp": int(time.time() * 1000), "step": step}
                       for k in range(METRICS_PER_REQUEST)]
            conn.request("POST", "/api/2.0/mlflow/runs/log-batch",
                         json.dumps({"run_id": runs[index], "metrics": metrics}).encode(), headers)
            response = conn.getresponse()
            response.read()
            with lock:
                counts["ok" if response.status == 200 else "errors"] += 1
        conn.close()

    started = time.monotonic()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(len(runs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return counts["ok"], counts["errors"], time.monotonic() - started


def stored_rows(workdir: Path, variant: str, runs: list[str]) -> int:
    with sqlite3.connect(workdir / f"{variant}-tracking.db") as db:
        marks = ",".join("?" * len(runs))
        return db.execute(f"SELECT COUNT(*) FROM metrics WHERE run_uuid IN ({marks})", runs).fetchone()[0]


def measure(variant: str, workdir: Path, requests: int, threads: int, profile_dir: Path | None = None) -> dict:
    port = common.free_port()
    process = start(variant, workdir, port, profile_dir)
    try:
        runs, auth = prepare(variant, port, threads)
        load(port, runs, auth, threads * 5)  # warm-up: credential cache, pools, imports
        before_rows = stored_rows(workdir, variant, runs)
        cpu_before = common.tree_cpu_seconds(process.pid)
        ok, errors, seconds = load(port, runs, auth, requests)
        cpu = common.tree_cpu_seconds(process.pid) - cpu_before
        rows = stored_rows(workdir, variant, runs) - before_rows
        if profile_dir is not None:
            for pid in common.descendants(process.pid):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"uvicorn" in f.read():
                        os.kill(pid, signal.SIGUSR1)  # the worker writes its profile
    finally:
        common.stop_process(process)
    return {"requests": requests, "ok": ok, "errors": errors, "seconds": round(seconds, 2),
            "requests_per_s": round(requests / seconds, 1), "cpu_ms_per_request": round(cpu * 1000 / requests, 2),
            "rows_stored": rows, "rows_expected": requests * METRICS_PER_REQUEST}


def print_profile(profile_dir: Path, top: int) -> None:
    import pstats

    deadline = time.monotonic() + 60
    while not (files := sorted(str(p) for p in profile_dir.glob("worker-*.prof"))):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker wrote no profile within 60 s")
        time.sleep(0.5)
    stats = pstats.Stats(*files, stream=sys.stdout)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = common.heading("Tracking server CPU per log-batch call, local", report)
    lines += [f"`runs/log-batch` with {METRICS_PER_REQUEST} metrics per call, {s['requests']} calls from "
              f"{s['threads']} threads (keep-alive, one run each) after a warm-up, {s['rounds']} rounds with the "
              "servers taking turns. Both servers run from the venv with `--workers 1` on SQLite files (tracking "
              "and, for ours, auth), no Docker and no Postgres; ours is `mlflow server --app-name stack-basic-auth` "
              "with the auth config the stack writes, called as a non-admin user holding EDIT on the experiment. "
              "Server CPU is utime + stime of the server's process tree. Medians over rounds, range in brackets. "
              "Before each measurement ours is checked to refuse the user's log-batch (403) before the grant "
              "and again right after it is revoked.",
              ""]
    rows = []
    for variant in ("ours", "plain"):
        runs = report["runs"][variant]

        def triple(key: str, runs: list[dict] = runs) -> str:
            values = [r[key] for r in runs]
            return f"{common.median(values):,.2f} ({min(values):,.2f} to {max(values):,.2f})"

        rows.append([variant, triple("cpu_ms_per_request"), triple("requests_per_s"),
                     f"{sum(r['errors'] for r in runs)} of {sum(r['requests'] for r in runs)}",
                     f"{sum(r['rows_stored'] for r in runs):,} / {sum(r['rows_expected'] for r in runs):,}"])
    lines += common.markdown_table(["server", "server CPU ms/request", "requests/s", "errors",
                                    "rows stored / expected"], rows)
    r = report["ratios"]
    lines += ["", f"Ours costs {common.fmt_ratio(r['cpu_per_request'])} the server CPU per request of plain "
              f"`mlflow server` and reaches {common.fmt_ratio(r['requests_per_s'])} its requests/s (medians of "
              "per-round ratios). The machine was shared with other work: requests/s is noisy, CPU per "
              "request less so.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = common.arguments(__doc__, rounds=3, quiet_threshold=1.0, quiet_patience=0)
    parser.add_argument("--requests", type=int, default=400, help="measured calls per server and round")
    parser.add_argument("--threads", type=int, default=4, help="concurrent clients")
    parser.add_argument("--profile", action="store_true", help="also profile ours once and print the hot spots")
    parser.add_argument("--top", type=int, default=40, help="functions printed with --profile")
    args = parser.parse_args()
    common.exit_on_signals()
    with tempfile.TemporaryDirectory(prefix="auth-profile-") as tmp:
        workdir = Path(tmp)
        if args.profile:
            profile_dir = workdir / "profile"
            profile_dir.mkdir()
            result = measure("ours", workdir, args.requests, args.threads, profile_dir)
            common.log(f"profiled run: {result}")
            print_profile(profile_dir, args.top)
            return
        report = {"date": common.now_iso(), "machine": common.machine(),
                  "settings": {"rounds": args.rounds, "requests": args.requests, "threads": args.threads},
                  "runs": {"ours": [], "plain": []}}
        for _, order in common.rounds(args.rounds, ["ours", "plain"], args.quiet_threshold, args.quiet_patience):
            for variant in order:
                result = measure(variant, workdir, args.requests, args.threads)
                common.log(f"{variant}: {result}")
                report["runs"][variant].append(result)
        report["ratios"] = {
            "cpu_per_request": common.per_round_ratios(report["runs"]["ours"], report["runs"]["plain"],
                                                       lambda r: r["cpu_ms_per_request"]),
            "requests_per_s": common.per_round_ratios(report["runs"]["ours"], report["runs"]["plain"],
                                                      lambda r: r["requests_per_s"]),
        }
        common.write_results("auth_profile", report, markdown(report), args.out_dir)


if __name__ == "__main__":
    main()
