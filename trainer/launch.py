"""`python -m trainer --nproc N [--nnodes M ...]`: one run trained by several processes.

Checks that the processes asked for fit this node, then hands them to PyTorch's own elastic
launcher (torch.distributed.launcher, the API behind torchrun) with a c10d rendezvous, which
starts `python -m trainer.distributed` once per process and restarts them all, up to
--max-restarts times, when one dies. On node 0 the launcher first creates the MLflow run that
every attempt's rank 0 continues, and it ends that run FAILED (with the reason) or KILLED
when the processes could not finish it themselves.
"""

import logging
import os
import sys
import uuid
from collections.abc import Sequence

import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from stack_common.text import one_line
from trainer import loop, tracking
from trainer.config import PROG, Config, ConfigError
from trainer.distributed import RUN_ID_ENV
from trainer.lifecycle import say, warn

EXIT_FAILED, EXIT_CONFIG = 1, 2
# One host and no endpoint: a rendezvous on a free loopback port, as torchrun --standalone does.
STANDALONE_ENDPOINT = "127.0.0.1:0"


def usable_cores() -> int:
    """CPU cores this process may run on (a container's cpuset, not the host's count)."""
    return len(os.sched_getaffinity(0))


def check_resources(conf: Config) -> torch.device:
    """The device the processes will use; ConfigError when this node cannot give each its own."""
    device = loop.pick_device(conf.device)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if conf.nproc > gpus:
            raise ConfigError(f"--nproc {conf.nproc} asks for more processes than the {gpus} GPU(s) visible here; "
                              "each process drives one GPU")
    elif conf.nproc > usable_cores():
        raise ConfigError(f"--nproc {conf.nproc} asks for more processes than the {usable_cores()} CPU core(s) "
                          "this node lets the trainer use")
    return device


def create_run(conf: Config, rdzv_id: str) -> str:
    """The run that every attempt's rank 0 logs to; created here so that restarts find it."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    uri = tracking.connect(conf.tracking_uri, conf.connect_timeout, log=print)
    experiment = mlflow.set_experiment(conf.experiment_name)
    tags = resolve_tags({"rdzv_id": rdzv_id, "world_size": str(conf.nnodes * conf.nproc)})
    run = MlflowClient().create_run(experiment.experiment_id, run_name=conf.run_name, tags=tags)
    run_id = run.info.run_id
    say(f"run {run_id} started: {tracking.run_url(uri, experiment.experiment_id, run_id)}")
    return run_id


def end_unfinished(run_id: str | None, status: str, reason: str, conf: Config) -> None:
    """End the run with status and the reason as a tag, if no rank could end it itself."""
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return
        client.set_tag(run_id, "failure_reason", reason[:5000])
        tracking.during_run(f"marking run {run_id} {status}", lambda: client.set_terminated(run_id, status),
                            conf.outage_timeout)
        warn(f"run {run_id} marked {status}")
    except Exception as error:  # noqa: BLE001 - the launch's own error is the one to show
        warn(f"could not mark run {run_id} {status}: {one_line(error, 300)}")


def launch_config(conf: Config, rdzv_id: str) -> LaunchConfig:
    timeout = max(1, int(conf.rdzv_timeout))
    return LaunchConfig(
        min_nodes=conf.nnodes, max_nodes=conf.nnodes, nproc_per_node=conf.nproc, run_id=rdzv_id,
        rdzv_backend="c10d", rdzv_endpoint=conf.rdzv_endpoint or STANDALONE_ENDPOINT,
        # Node 0 hosts the rendezvous store: said outright rather than guessed from host names,
        # which a container's name and address often do not match. Both waits are bounded.
        rdzv_configs={"is_host": conf.node_rank == 0, "join_timeout": timeout, "read_timeout": timeout},
        max_restarts=conf.max_restarts, monitor_interval=0.5, start_method="spawn")


def failure_of(error: ChildFailedError, conf: Config) -> tuple[str, int]:
    """(reason, exit status) of the first process that failed in the last attempt."""
    rank, failure = error.get_first_failure()
    code = failure.exitcode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    reason = f"rank {rank} {how} after {conf.max_restarts} restart(s) of {conf.max_restarts} allowed"
    return reason, code if code in (EXIT_FAILED, EXIT_CONFIG) else EXIT_FAILED


def quiet_agent() -> None:
    """Silence the elastic agent's own log lines (each with a timestamp and a source path): the
    ranks and the launcher say in one line each what failed, and rank 0 says when it restarts."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def run(conf: Config, argv: Sequence[str] | None = None) -> int:
    """Launch this node's processes for a checked Config; return the exit status."""
    try:
        device = check_resources(conf)
    except ConfigError as error:
        warn(f"{PROG}: error: {error}")
        return EXIT_CONFIG
    rdzv_id = conf.rdzv_id or uuid.uuid4().hex
    workers: dict[str, str] = {}
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Each process gets its share of the cores instead of all of them fighting for every one.
        workers["OMP_NUM_THREADS"] = str(max(1, usable_cores() // conf.nproc))
    run_id = None
    if conf.tracking and conf.node_rank == 0:
        try:
            run_id = create_run(conf, rdzv_id)
        except tracking.TrackingUnavailable as error:
            warn(f"error: {error}")
            return EXIT_FAILED
        workers[RUN_ID_ENV] = run_id
    say(f"launching {conf.nproc} process(es) on node {conf.node_rank} of {conf.nnodes}, "
        f"rendezvous {conf.rdzv_endpoint or 'on this host'} (id {rdzv_id})")
    quiet_agent()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with tracking.environment(workers):
            elastic_launch(launch_config(conf, rdzv_id), sys.executable)("-m", "trainer.distributed", *args)
    except ChildFailedError as error:
        reason, code = failure_of(error, conf)
        if code != EXIT_CONFIG:  # a refused configuration was said in one line by the ranks themselves
            warn(f"error: training failed: {reason}; its own error is above")
        end_unfinished(run_id, "FAILED", reason, conf)
        return code
    except RendezvousTimeoutError:
        reason = (f"not all {conf.nnodes} node(s) joined the rendezvous at {conf.rdzv_endpoint} within "
                  f"--rdzv-timeout {conf.rdzv_timeout:g} s")
        warn(f"error: {reason}")
        end_unfinished(run_id, "FAILED", reason, conf)
        return EXIT_FAILED
    except RendezvousError as error:
        reason = (f"the rendezvous endpoint {conf.rdzv_endpoint} did not answer within --rdzv-timeout "
                  f"{conf.rdzv_timeout:g} s ({one_line(error.__cause__ or error, 200)})")
        warn(f"error: {reason}")
        end_unfinished(run_id, "FAILED", reason, conf)
        return EXIT_FAILED
    except SignalException as error:
        end_unfinished(run_id, "KILLED", f"launcher stopped by {error.sigval.name}", conf)
        return 128 + int(error.sigval)
    return 0
