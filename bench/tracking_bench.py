"""Benchmark: the stack's tracking server against plain `mlflow server`, on the same Postgres.

    python bench/tracking_bench.py [--rounds 3] [--seconds 15] [--clients 20] [--cpus 1]

In throwaway containers on a throwaway Docker network (all named bench-tracking-*, removed
at the end), with the stack's own images, which must already exist (`make build`):

  postgres  the stack's Postgres image, one instance for both servers, a database each
  ours      the stack's tracking server image started as compose.yaml starts it: basic
            auth, 2 workers, schema upgrade, read-only root; the trainer account created
            by the stack's own provisioning script, and the clients log as that account
  ours, grants read every call
            the same with MLFLOW_AUTH_GRANT_CACHE_SECONDS=0, on the same databases: what
            the grant cache (tracking/auth_lookups.py) buys
  plain     the same image with its entrypoint replaced by `mlflow server --host 0.0.0.0
            --workers 2`: the same number of uvicorn workers as ours, no auth; the backend store URI
            comes through MLFLOW_BACKEND_STORE_URI, which `--backend-store-uri` reads, so
            the password stays off the command line

All servers get the same CPU limit (docker --cpus) and are published on 127.0.0.1 only.
`--clients` connections each log to their own run: every request is one
`runs/log-batch` call carrying 10 metrics at a new step, as MlflowClient.log_batch sends
it. The servers take turns for `--seconds` each, `--rounds` times; each comparison is the
median of the per-round ratios with their range. Afterwards the metrics
stored for each server's runs are counted, so that nothing answered 200 and was lost. The
artifact store is never touched by log_batch; ours points at an S3 endpoint where nothing
listens. Results: bench/results/tracking.json and .md.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request

from bench import common
from bench.common import fmt, fmt_ratio, log

MLFLOW_IMAGE = os.environ.get("BENCH_MLFLOW_IMAGE", "mlops/mlflow:dev")
POSTGRES_IMAGES = ("mlops-local/postgres:17", "postgres:17-bookworm")
METRICS_PER_REQUEST = 10
VARIANTS = ("ours", "ours_uncached", "plain")
WORKERS = 2
LABELS = {"ours": f"ours (basic auth, {WORKERS} workers)",
          "ours_uncached": "ours, grants read every call (`MLFLOW_AUTH_GRANT_CACHE_SECONDS=0`)",
          "plain": f"`mlflow server --workers {WORKERS}` (no auth)"}
EXPERIMENT = "fashion-mnist"


def docker(*args, check=True, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... failed: {result.stderr.strip()[-2000:]}")
    return result


def image_exists(image: str) -> bool:
    return docker("image", "inspect", image, check=False).returncode == 0


class Containers:
    """Everything this run starts, by name, so that it all goes at the end whatever happens."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.network = prefix
        self.names: list[str] = []

    def run(self, name: str, *args, env=None) -> str:
        full = f"{self.prefix}-{name}"
        self.names.append(full)
        docker("run", "-d", "--name", full, "--network", self.network, *args, env=env)
        return full

    def cleanup(self) -> None:
        for name in reversed(self.names):
            # -v: the Postgres image declares its data directory a volume; it goes too.
            docker("rm", "-f", "-v", name, check=False)
        docker("network", "rm", self.network, check=False)


def container_id(name: str) -> str:
    return docker("inspect", "--format", "{{.Id}}", name).stdout.strip()


def published_port(name: str) -> int:
    out = docker("port", name, "5000/tcp").stdout.strip().splitlines()[0]
    return int(out.rsplit(":", 1)[1])


def api(port: int, method: str, path: str, body=None, auth: str | None = None, timeout=30) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": auth} if auth else {})})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def wait_api(port: int, auth: str | None, name: str, timeout_s: float = 300) -> None:
    """Until a real API call answers (not /health, which skips the database and auth)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            api(port, "GET", "experiments/search?max_results=1", auth=auth, timeout=10)
            return
        except (OSError, ValueError) as e:
            last = e
        state = docker("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state not in ("running", "created"):
            logs = docker("logs", "--tail", "40", name, check=False)
            raise RuntimeError(f"{name} stopped ({state}):\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(1)
    raise RuntimeError(f"{name} did not answer the API within {timeout_s:.0f} s (last: {last})")


def psql(postgres: str, password: str, database: str, sql: str, check=True) -> subprocess.CompletedProcess:
    # A bare `-e PGPASSWORD` takes the value from the docker client's environment: the
    # password never appears on a command line.
    return docker("exec", "-e", "PGPASSWORD", postgres, "psql", "-h", "127.0.0.1", "-U", "mlflow", "-d", database,
                  "-tAc", sql, check=check, env={**os.environ, "PGPASSWORD": password})


def password_check_cost(container: str) -> float | None:
    """CPU milliseconds of one password check as MLflow's basic-auth store does it
    (werkzeug's default hash), measured inside the server's own image and CPU limit."""
    code = ("import time\nfrom werkzeug.security import check_password_hash, generate_password_hash\n"
            "h = generate_password_hash('bench-password')\ncosts = []\n"
            "for _ in range(3):\n    t = time.process_time()\n    check_password_hash(h, 'bench-password')\n"
            "    costs.append(time.process_time() - t)\nprint(sorted(costs)[1] * 1000)\n")
    out = docker("exec", container, "python", "-c", code, check=False)
    try:
        return round(float(out.stdout.strip()), 1)
    except ValueError:
        return None


def make_requests(port: int, runs: list[str], auth: str | None):
    """A function (client index, its request count) -> one log-batch request: 10 metrics at
    a step no request of that run used before, so that every call inserts 10 new rows."""
    host = f"127.0.0.1:{port}"
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    # Steps continue across rounds: each round's requests are new rows, never duplicates.
    next_step = {run: 0 for run in runs}

    def make(index: int, n: int) -> bytes:
        run = runs[index % len(runs)]
        step = next_step[run]
        next_step[run] = step + 1
        ts = int(time.time() * 1000)
        metrics = [{"key": f"metric_{k}", "value": (step * 7 + k) % 101 / 100.0, "timestamp": ts, "step": step}
                   for k in range(METRICS_PER_REQUEST)]
        return common.http_request("POST", "/api/2.0/mlflow/runs/log-batch", host,
                                   json.dumps({"run_id": run, "metrics": metrics}).encode(), headers)

    return make


def markdown(report) -> str:
    f, s = report["figures"], report["settings"]
    lines = [
        *common.heading("Tracking server benchmark", report),
        f"`runs/log-batch` with {METRICS_PER_REQUEST} metrics per call, {s['clients']} concurrent clients "
        f"(keep-alive connections, one run each), {s['seconds']:g} s per phase, {s['rounds']} rounds with the "
        f"servers taking turns; medians over rounds (range in brackets), ratios the median of the per-round "
        f"ratios. All three servers are the stack's "
        f"`{s['mlflow_image']}` image limited to `--cpus {s['cpus']:g}`, on one Postgres "
        f"(`{s['postgres_image']}`, no CPU limit; the two of ours share the stack's databases, plain "
        f"`mlflow server` has its own), published on 127.0.0.1; the load client runs on the host. The rows "
        f"stored for each server's runs are counted afterwards.", "",
    ]
    lines += common.markdown_table(
        ["server", "requests/s", "metrics/s", "p50 ms", "p99 ms", "errors", "server CPU ms/request",
         "Postgres CPU ms/request", "rows stored / expected"],
        [[LABELS[v], f"{fmt(a['requests_per_sec'], ',.0f')} ({fmt(a['requests_per_sec_range'][0], ',.0f')} to "
                     f"{fmt(a['requests_per_sec_range'][1], ',.0f')})",
          fmt(a["requests_per_sec"] * METRICS_PER_REQUEST, ",.0f"), fmt(a["p50_ms"], ".1f"), fmt(a["p99_ms"], ".1f"),
          f"{a['failed']} of {a['requests']:,}", fmt(a["server_cpu_ms_per_request"], ".2f"),
          fmt(a["postgres_cpu_ms_per_request"], ".2f"), f"{a['rows_stored']:,} / {a['rows_expected']:,}"]
         for v, a in ((v, f[v]) for v in VARIANTS)])
    lines += ["", f"Ours reaches {fmt_ratio(f['rps_ratio'])} the requests/s of plain `mlflow server` "
              f"(p99 {fmt_ratio(f['p99_ratio'])}); with grants read on every call, "
              f"{fmt_ratio(f['uncached_rps_ratio'])}, so the grant cache gives ours "
              f"{fmt_ratio(f['grant_cache_gain'])} the requests/s it has without it. {report['explanation']}", "",
              f"The machine: load average (1 min) {f['load_1min_range'][0]:.1f} to {f['load_1min_range'][1]:.1f} "
              f"during the phases; other processes took a median {f['median_others_cpu_share']:.0%} (max "
              f"{f['max_others_cpu_share']:.0%}) of all CPUs. {report['verdict']}", ""]
    if any(f[v]["failures"] for v in VARIANTS):
        lines += ["Errors by kind: " + "; ".join(f"{v}: {f[v]['failures']}" for v in VARIANTS) + ".", ""]
        for v in VARIANTS:
            for status, text in f[v]["error_samples"].items():
                lines += [f"First {status} answer from {v}: `{' '.join(text.split())[:200]}`", ""]
    return "\n".join(lines)


def figures_of(samples: dict, counts: dict) -> dict:
    """Medians over rounds for each server, errors and stored rows over every phase, and the
    comparisons as medians of per-round ratios."""
    figures = {}
    for v in VARIANTS:
        runs = samples[v]
        every = runs + samples[f"{v}_warmup"]
        rps = [s["requests_per_sec"] or 0.0 for s in runs]
        failures, error_samples = {}, {}
        for s in every:
            for k, n in s["failures"].items():
                failures[k] = failures.get(k, 0) + n
            for k, text in s["error_samples"].items():
                error_samples.setdefault(str(k), text)
        figures[v] = {
            "requests_per_sec": common.median(rps), "requests_per_sec_range": [min(rps), max(rps)],
            "p50_ms": common.median([s["latency_ms"]["p50"] for s in runs]),
            "p99_ms": common.median([s["latency_ms"]["p99"] for s in runs]),
            "server_cpu_ms_per_request": common.median([s["server_cpu_ms_per_request"] for s in runs]),
            "postgres_cpu_ms_per_request": common.median([s["postgres_cpu_ms_per_request"] for s in runs]),
            "requests": sum(s["requests"] for s in every), "failed": sum(s["failed"] for s in every),
            "failures": failures, "error_samples": error_samples,
            "rows_stored": counts[v], "rows_expected": sum(s["ok"] for s in every) * METRICS_PER_REQUEST,
        }
    # Each round's pair ran back to back: the comparison is the median of those ratios.
    figures["rps_ratio"] = common.per_round_ratios(samples["ours"], samples["plain"], lambda s: s["requests_per_sec"])
    figures["p99_ratio"] = common.per_round_ratios(samples["ours"], samples["plain"], lambda s: s["latency_ms"]["p99"])
    figures["uncached_rps_ratio"] = common.per_round_ratios(samples["ours_uncached"], samples["plain"],
                                                            lambda s: s["requests_per_sec"])
    figures["grant_cache_gain"] = common.per_round_ratios(samples["ours"], samples["ours_uncached"],
                                                          lambda s: s["requests_per_sec"])
    measured = [s for v in VARIANTS for s in samples[v]]
    loads = [x for s in measured for x in (s["load_before"][0], s["load_after"][0])]
    others = [s["others_cpu_share"] for s in measured]
    figures.update(load_1min_range=[min(loads), max(loads)], median_others_cpu_share=common.median(others),
                   max_others_cpu_share=max(others))
    return figures


def main():
    parser = common.arguments(__doc__, rounds=3, seconds=15, quiet_patience=120)
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients, one run each (default 20)")
    parser.add_argument("--cpus", type=float, default=1.0, help="docker --cpus for each server (default 1)")
    args = parser.parse_args()

    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise SystemExit("tracking_bench: no Docker engine answers; start one (see README) and retry")
    postgres_image = next((i for i in POSTGRES_IMAGES if image_exists(i)), None)
    missing = [i for i in (MLFLOW_IMAGE,) if not image_exists(i)]
    missing += [] if postgres_image else [" or ".join(POSTGRES_IMAGES)]
    if missing:
        raise SystemExit(f"tracking_bench: image(s) missing: {', '.join(missing)}; run make build first")

    info = common.machine(docker=True)
    suffix = secrets.token_hex(3)
    c = Containers(f"bench-tracking-{suffix}")
    common.exit_on_signals()  # so that the containers are removed
    secret_env = {**os.environ,
                  "POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": secrets.token_urlsafe(18), "POSTGRES_DB": "mlflow",
                  "MLFLOW_DB_USER": "mlflow_app", "MLFLOW_DB_PASSWORD": secrets.token_urlsafe(18),
                  "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(18),
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24),
                  "TRAINER_USERNAME": "trainer", "TRAINER_PASSWORD": secrets.token_urlsafe(18),
                  "SERVING_USERNAME": "serving", "SERVING_PASSWORD": secrets.token_urlsafe(18),
                  "OPTUNA_DB_PASSWORD": secrets.token_urlsafe(18), "MONITORING_PASSWORD": secrets.token_urlsafe(18),
                  "PREDICTION_LOG_PASSWORD": secrets.token_urlsafe(18),
                  "AWS_ACCESS_KEY_ID": "bench-unused", "AWS_SECRET_ACCESS_KEY": "bench-unused"}
    pg_password = secret_env["POSTGRES_PASSWORD"]
    secret_env["MLFLOW_BACKEND_STORE_URI"] = (
        f"postgresql+psycopg2://mlflow:{secret_env['POSTGRES_PASSWORD']}@postgres:5432/mlflow_plain")
    samples = {v: [] for v in VARIANTS}
    counts = {}
    server_logs = {}
    password_check_ms = None
    auth_cache = None
    try:
        docker("network", "create", c.network)
        # Values passed as bare `-e NAME` come from this process's environment: no secret
        # appears on a command line.
        pg = c.run("postgres", "--network-alias", "postgres", "--shm-size", "256m",
                   "-e", "POSTGRES_USER", "-e", "POSTGRES_PASSWORD", "-e", "POSTGRES_DB", postgres_image,
                   env=secret_env)
        # Over TCP: the image's entrypoint first runs a socket-only server for initialisation,
        # then restarts; only the final server listens on the network, as the servers need.
        deadline = time.monotonic() + 180
        while psql(pg, pg_password, "mlflow", "SELECT 1", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("Postgres did not accept TCP connections within 180 s")
            time.sleep(1)
        psql(pg, pg_password, "mlflow", "CREATE DATABASE mlflow_plain")
        # Ours logs in as its own role, as in the stack: db-init's one-shot makes it.
        docker("run", "--rm", "--network", c.network, "--entrypoint", "python",
               "-e", "POSTGRES_USER", "-e", "POSTGRES_PASSWORD", "-e", "POSTGRES_DB",
               "-e", "MLFLOW_DB_USER", "-e", "MLFLOW_DB_PASSWORD", "-e", "OPTUNA_DB_PASSWORD", MLFLOW_IMAGE,
               "-m", "tracking.init_database",
               env=secret_env)

        cpus = f"{args.cpus:g}"

        def stack_server(name: str, *extra: str) -> str:
            return c.run(name, *extra, "-p", "127.0.0.1::5000", "--cpus", cpus,
                         "--memory", "2g", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                         "--security-opt", "no-new-privileges:true",
                         "-e", "POSTGRES_DB", "-e", "MLFLOW_DB_USER", "-e", "MLFLOW_DB_PASSWORD",
                         "-e", "S3_BUCKET=mlflow", "-e", "MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9",
                         "-e", "AWS_ACCESS_KEY_ID", "-e", "AWS_SECRET_ACCESS_KEY", "-e", "AWS_DEFAULT_REGION=us-east-1",
                         "-e", "MLFLOW_ADMIN_USERNAME", "-e", "MLFLOW_ADMIN_PASSWORD",
                         "-e", "MLFLOW_FLASK_SERVER_SECRET_KEY", "-e", f"MLFLOW_WORKERS={WORKERS}", MLFLOW_IMAGE,
                         env=secret_env)

        ours = stack_server("ours", "--network-alias", "mlflow")
        # Started once ours has made the schema, so the two never migrate it at once.
        wait_api(published_port(ours), "Basic " + base64.b64encode(
            f"admin:{secret_env['MLFLOW_ADMIN_PASSWORD']}".encode()).decode(), ours)
        uncached = stack_server("ours-uncached", "-e", "MLFLOW_AUTH_GRANT_CACHE_SECONDS=0")
        plain = c.run("plain", "-p", "127.0.0.1::5000", "--cpus", cpus, "-e", "MLFLOW_BACKEND_STORE_URI",
                      "--entrypoint", "mlflow", MLFLOW_IMAGE, "server", "--host", "0.0.0.0",
                      "--workers", str(WORKERS), env=secret_env)
        ports = {"ours": published_port(ours), "ours_uncached": published_port(uncached),
                 "plain": published_port(plain)}
        admin = "Basic " + base64.b64encode(f"admin:{secret_env['MLFLOW_ADMIN_PASSWORD']}".encode()).decode()
        trainer = "Basic " + base64.b64encode(f"trainer:{secret_env['TRAINER_PASSWORD']}".encode()).decode()
        wait_api(ports["ours_uncached"], admin, uncached)
        wait_api(ports["plain"], None, plain)
        # The stack's own provisioning: trainer and serving accounts, the experiment, the rights.
        c.names.append(f"{c.prefix}-init")
        init = docker("run", "--rm", "--name", f"{c.prefix}-init", "--network", c.network,
                      "--entrypoint", "python", "-e", "MLFLOW_ADMIN_USERNAME", "-e", "MLFLOW_ADMIN_PASSWORD",
                      "-e", "TRAINER_USERNAME", "-e", "TRAINER_PASSWORD", "-e", "SERVING_USERNAME",
                      "-e", "SERVING_PASSWORD", "-e", "MONITORING_PASSWORD", "-e", "PREDICTION_LOG_PASSWORD",
                      "-e", f"EXPERIMENT_NAME={EXPERIMENT}",
                      "-e", "MODEL_NAME=bench-model", MLFLOW_IMAGE, "-m", "tracking.provision_users",
                      env=secret_env, check=False)
        if init.returncode != 0:
            raise RuntimeError(f"provisioning failed: {init.stderr[-2000:]}")
        log("servers up on 127.0.0.1: " + ", ".join(f"{v} :{ports[v]}" for v in VARIANTS) + f"; --cpus {cpus}")

        auths = {"ours": trainer, "ours_uncached": trainer, "plain": None}
        ours_experiment = api(ports["ours"], "GET", f"experiments/get-by-name?experiment_name={EXPERIMENT}",
                              auth=trainer)["experiment"]["experiment_id"]
        experiment_ids = {
            "ours": ours_experiment, "ours_uncached": ours_experiment,
            "plain": api(ports["plain"], "POST", "experiments/create", {"name": EXPERIMENT})["experiment_id"],
        }
        makers, run_ids = {}, {}
        for v in VARIANTS:
            run_ids[v] = [api(ports[v], "POST", "runs/create",
                              {"experiment_id": experiment_ids[v], "run_name": f"bench-client-{i}",
                               "start_time": int(time.time() * 1000)}, auth=auths[v])["run"]["info"]["run_id"]
                          for i in range(args.clients)]
            makers[v] = make_requests(ports[v], run_ids[v], auths[v])
        ids = {"ours": container_id(ours), "ours_uncached": container_id(uncached), "plain": container_id(plain),
               "postgres": container_id(pg)}

        log("warming up the servers")
        for v in VARIANTS:
            result = common.run_async(common.drive("127.0.0.1", ports[v], makers[v], args.clients, 3, timeout_s=60))
            samples.setdefault(f"{v}_warmup", []).append(result.summary())
        for r, order in common.rounds(args.rounds, VARIANTS, args.quiet_threshold, args.quiet_patience):
            for v in order:
                with common.CpuWindow(containers=[ids[v], ids["postgres"]]) as window:
                    result = common.run_async(common.drive("127.0.0.1", ports[v], makers[v], args.clients,
                                                           args.seconds, timeout_s=60))
                s = result.summary()
                ok = max(s["ok"], 1)
                s.update(window.as_dict(),
                         server_cpu_ms_per_request=round(window.container_cpu[ids[v]] / ok * 1000, 3),
                         postgres_cpu_ms_per_request=round(window.container_cpu[ids["postgres"]] / ok * 1000, 3))
                samples[v].append(s)
                lat = s["latency_ms"]
                log(f"round {r + 1} {v}: {fmt(s['requests_per_sec'], ',.1f')} req/s, p50 {fmt(lat['p50'], '.1f')} ms, "
                    f"p99 {fmt(lat['p99'], '.1f')} ms, {s['failed']} errors; others {window.others_share:.0%} of "
                    f"the CPUs, load {window.load_before[0]:.1f} -> {window.load_after[0]:.1f}")
        for v in VARIANTS:
            database = "mlflow_plain" if v == "plain" else "mlflow"
            runs = ", ".join(f"'{run}'" for run in run_ids[v])  # ids the servers made: hex only
            counts[v] = int(psql(pg, pg_password, database,
                                 f"SELECT count(*) FROM metrics WHERE run_uuid IN ({runs})").stdout.strip())
        password_check_ms = password_check_cost(ours)
        # Only this line of the auth config: the rest holds the database password.
        out = docker("exec", ours, "sh", "-c", "grep -h '^auth_cache_ttl_seconds' /tmp/mlflow-auth-*.ini", check=False)
        auth_cache = out.stdout.strip().partition("=")[2].strip() or "0 (not set)"
        for v, name in (("ours", ours), ("ours_uncached", uncached), ("plain", plain)):
            out = docker("logs", "--tail", "15", name, check=False)
            server_logs[v] = (out.stdout + out.stderr)[-2500:]
    finally:
        c.cleanup()
        log("containers and network removed")

    info["load_average_at_end"] = common.load_average()
    figures = figures_of(samples, counts)
    lost = any(figures[v]["rows_stored"] != figures[v]["rows_expected"] for v in VARIANTS)
    explanation = (
        "Ours authenticates and authorises every call (MLflow's basic-auth app): it checks the password "
        "against its stored hash, unless MLflow's credential cache already holds it "
        f"(`auth_cache_ttl_seconds` in the auth config the stack writes: {auth_cache}), then checks the "
        "caller's right on the run's experiment, from grants each worker keeps for "
        "MLFLOW_AUTH_GRANT_CACHE_SECONDS (5 by default; forgotten at once when the server takes a change to "
        "users or grants); plain `mlflow server` does neither.")
    if password_check_ms is not None:
        explanation += (f" One password check costs {password_check_ms:.0f} ms of CPU in this image "
                        "(werkzeug's default scrypt hash).")
    if any("QueuePool" in text for v in VARIANTS for text in figures[v]["error_samples"].values()):
        explanation += (
            " The QueuePool errors: MLflow's SQL store keeps one pooled connection for the whole log_batch "
            "call and takes a second one inside it (for the metrics); with SQLAlchemy's default pool (5 + 10 "
            "overflow per process), 15 or more concurrent calls in one worker process can each hold one "
            "connection and wait for another until the 30 s pool timeout.")
    if lost:
        explanation += " ROWS STORED DIFFER FROM ROWS ANSWERED: see the counts."
    verdict = ("The machine was reasonably quiet." if figures["median_others_cpu_share"] < 0.15 else
               "The machine was busy with other work during the runs: absolute figures are lower and "
               "noisier than on a quiet machine; the servers took turns, so the comparison is the figure to read.")
    figures["password_check_cpu_ms"] = password_check_ms
    figures["auth_cache_ttl_seconds"] = auth_cache
    report = {"date": common.now_iso(), "machine": info, "explanation": explanation, "verdict": verdict,
              "settings": {"rounds": args.rounds, "seconds": args.seconds, "clients": args.clients, "cpus": args.cpus,
                           "metrics_per_request": METRICS_PER_REQUEST, "mlflow_image": MLFLOW_IMAGE,
                           "postgres_image": postgres_image,
                           "ours": f"image entrypoint (start_server.py): --app-name stack-basic-auth, --workers {WORKERS}, "
                                   "clients log as the provisioned trainer account",
                           "ours_uncached": "the same, MLFLOW_AUTH_GRANT_CACHE_SECONDS=0, same databases",
                           "plain": f"mlflow server --host 0.0.0.0 --workers {WORKERS} "
                                    "(backend store via MLFLOW_BACKEND_STORE_URI)"},
              "figures": figures, "samples": samples, "server_log_tails": server_logs}
    common.write_results("tracking", report, markdown(report), args.out_dir)
    return 1 if lost or any(figures[v]["failed"] for v in VARIANTS) else 0


if __name__ == "__main__":
    sys.exit(main())
