"""Entry point of the serving container: `python -m serving`.

Validates the environment (one line and exit status 2 on nonsense), points every
writable path at /tmp so that the root filesystem can be read-only, then replaces itself
with gunicorn.
"""

import os
import sys
import tempfile

from serving import config


def _prepare_environment(settings: config.Settings) -> None:
    env = os.environ
    # MLflow and torch look under $HOME; a non-root user in a read-only image may have
    # none, or one that cannot be written.
    home = env.get("HOME", "")
    if not home or not os.access(home, os.W_OK):
        env["HOME"] = "/tmp"
    env.setdefault("TMPDIR", "/tmp")
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    # Thread pools sized before torch or numpy start them: workers x threads <= cores.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(name, str(settings.torch_threads))
    # Workers keep their Prometheus values in files there; prometheus_client reads the
    # variable when it is imported, so it is set before gunicorn starts any worker. A
    # directory of its own unless one is given: two servers must not mix their values.
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="serving-metrics-")
    # MLflow's client retry bounds and telemetry switch come from compose's client environment.


def _check_cores(settings: config.Settings) -> None:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if settings.workers * settings.torch_threads > cores:
        print(
            f"serving: warning: SERVING_WORKERS x SERVING_TORCH_THREADS = "
            f"{settings.workers * settings.torch_threads} exceeds the {cores} cores available",
            file=sys.stderr,
        )


def main() -> None:
    try:
        settings = config.from_env()
    except config.ConfigError as e:
        print(f"serving: {e}", file=sys.stderr)
        sys.exit(2)
    _prepare_environment(settings)
    _check_cores(settings)
    conf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gunicorn.conf.py")
    argv = [sys.executable, "-m", "gunicorn", "--config", conf, *sys.argv[1:]]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
