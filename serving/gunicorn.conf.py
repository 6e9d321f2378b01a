"""gunicorn settings for the serving container; values come from the environment only.

Start with `python -m serving`, which validates the environment first and then runs
`gunicorn --config serving/gunicorn.conf.py`.
"""

import os
import sys
from typing import TYPE_CHECKING

# Every top-level name here that matches a gunicorn setting is read as one, hence the alias.
from serving import config as serving_config
from serving import metrics_files

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.workers.base import Worker

try:
    _settings = serving_config.from_env()
except serving_config.ConfigError as e:
    print(f"serving: {e}", file=sys.stderr)
    sys.exit(2)

try:
    import uvicorn_worker  # noqa: F401

    worker_class = "uvicorn_worker.UvicornWorker"
except ImportError:  # uvicorn before the worker moved to its own package
    worker_class = "uvicorn.workers.UvicornWorker"

wsgi_app = "serving.app:create_app()"
bind = [_settings.bind]
workers = _settings.workers
proc_name = "serving"

# Each worker owns its model and watcher, so workers are not preloaded: nothing (torch's
# thread pools included) is shared across fork.
preload_app = False
# A worker that stops answering its heartbeat is replaced; scoring runs off the event
# loop, so only a truly stuck worker misses it.
timeout = 60
# On SIGTERM, requests in flight get this long to finish.
graceful_timeout = _settings.graceful_timeout
# Clients of a model server reuse connections; two seconds is too short between calls.
keepalive = 5

# Read-only root filesystem: heartbeat files in shared memory (or the /tmp tmpfs), and no
# control socket (gunicorn would create it under $HOME/.gunicorn).
worker_tmp_dir = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
control_socket_disable = True

errorlog = "-"
loglevel = "info"
# One line per request costs throughput; the version header tells clients what answered.
accesslog = None


# Prometheus values of all workers live in PROMETHEUS_MULTIPROC_DIR (serving/metrics.py).
def on_starting(server: "Arbiter") -> None:
    metrics_files.reset()


def child_exit(server: "Arbiter", worker: "Worker") -> None:
    metrics_files.forget_worker(worker.pid)
