"""Flags of `python -m trainer`, each defaulting to an environment variable.

Compose passes settings as environment variables and a laptop user passes flags; click
declares both once, in SETTINGS. Every value is checked before MLflow is contacted, so a
typo costs one line on stderr and exit status 2, never a half-made run.
`python -m trainer.config` prints the flag table of trainer/README.md.
"""

import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

import model_signatures

PROG = "python -m trainer"
ARCHITECTURES = ("small-cnn", "quickstart")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PROMOTION_POLICIES = ("if-better", "always", "never")
LR_SCALINGS = ("none", "linear")

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# MLflow rejects '/' and ':' in model names; aliases are word characters and hyphens.
MODEL_NAME = re.compile(r"^[^/:\s][^/:]{0,254}$")
ALIAS = re.compile(r"^[\w-]{1,255}$")
RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)
SCHEME = re.compile(r"^([A-Za-z][\w+.-]*):")
# host, host:port, [v6]:port; torch's c10d rendezvous parses it and defaults the port to 29400.
ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?$")
RDZV_ID = re.compile(r"^[\w.-]{1,128}$")


class ConfigError(Exception):
    """A flag or environment value outside its accepted range."""


@dataclass(frozen=True)
class Config:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    lr_schedule: str
    seed: int
    arch: str
    device: str
    data_dir: Path
    download: bool
    max_train_samples: int
    max_test_samples: int
    log_every: int
    tracking: bool
    tracking_uri: str | None
    experiment_name: str
    run_name: str | None
    model_name: str
    model_alias: str
    promotion_policy: str
    connect_timeout: float
    outage_timeout: float
    resume_from: str | None
    nproc: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str | None
    rdzv_id: str | None
    rdzv_timeout: float
    max_restarts: int
    lr_scaling: str
    # From MODEL_SIGNING_KEY only (never a flag, which `ps` would show); None without tracking.
    signing_key: model_signatures.PrivateKey | None = None


# Types click lacks. Each fails with the accepted range, which the error line and the
# README table both show.


class Checked(click.ParamType):
    """Text accepted by `check`, which returns the value or None when it is refused."""

    def __init__(self, name: str, accepted: str, optional: bool = False) -> None:
        self.name = name
        self.accepted = accepted
        self.optional = optional

    def check(self, text: str) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (self.optional and value == ""):
            return None
        checked = self.check(str(value))
        if checked is None:
            self.fail(self.accepted, param, ctx)
        return checked


class Matching(Checked):
    def __init__(self, name: str, pattern: re.Pattern[str], accepted: str, reserved: re.Pattern[str] | None = None,
                 optional: bool = False) -> None:
        super().__init__(name, accepted, optional)
        self.pattern, self.reserved = pattern, reserved

    def check(self, text: str) -> str | None:
        refused = not self.pattern.match(text) or (self.reserved is not None and self.reserved.match(text))
        return None if refused else text


class Name(Checked):
    def __init__(self, limit: int, optional: bool = False) -> None:
        super().__init__("name", f"a non-empty name of at most {limit} characters", optional)
        self.limit = limit

    def check(self, text: str) -> str | None:
        return text if text.strip() and len(text) <= self.limit else None


class TrackingUri(Checked):
    def __init__(self) -> None:
        super().__init__("uri", "a tracking URI (" + ", ".join(s + ":" for s in TRACKING_SCHEMES) + ")",
                         optional=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = super().convert(value, param, ctx)
        if text is not None and re.match(r"^https?:", text) and not re.match(r"^https?://[^/\s]+", text):
            self.fail("a tracking URI such as http://host:5000", param, ctx)
        return text

    def check(self, text: str) -> str | None:
        scheme = SCHEME.match(text)
        known = scheme is None or scheme.group(1).lower().split("+", 1)[0] in TRACKING_SCHEMES
        return text if known else None


class Directory(click.Path):
    accepted = "a directory path"

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not str(value).strip():
            self.fail(self.accepted, param, ctx)
        if Path(value).expanduser().is_file():
            self.fail("a directory path (this path is a file)", param, ctx)
        return super().convert(Path(value).expanduser(), param, ctx)


class FiniteRange(click.FloatRange):
    """click's FloatRange lets NaN through: no comparison with NaN is true."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail("not a finite number", param, ctx)
        return number


def accepted(kind: click.ParamType) -> str:
    """What a value of this type must be, in the words of the error line."""
    if isinstance(kind, click.IntRange):
        return f"an integer from {kind.min} to {kind.max}" if kind.max is not None else f"an integer from {kind.min}"
    if isinstance(kind, click.FloatRange):
        return f"a number in {'(' if kind.min_open else '['}{kind.min:g}, {kind.max:g}]"
    if isinstance(kind, click.Choice):
        return "one of " + ", ".join(map(str, kind.choices))
    if isinstance(kind, click.types.BoolParamType):
        return "a boolean (1/0, true/false, yes/no, on/off)"
    return getattr(kind, "accepted", kind.name)


class OneLine:
    """A refused value becomes one line naming the flag, the variable it came from, the
    accepted range and the value given."""

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        try:
            return super().process_value(ctx, value)  # type: ignore[misc]
        except click.MissingParameter:
            raise  # click's own line names what is missing
        except click.BadParameter as error:
            must = error.message if isinstance(self.type, Checked | Directory) else accepted(self.type)
            raise ConfigError(f"{self.source(ctx)} must be {must}, got {value!r}") from None

    def source(self, ctx: click.Context) -> str:
        return self.human_readable_name  # type: ignore[attr-defined]


class Setting(OneLine, click.Option):
    """A flag with its environment variable, read from the mapping in ctx.obj so that
    tests can pass their own environment."""

    def __init__(self, flag: str, envvar: str | None, help: str, **kwargs: Any) -> None:
        kwargs.setdefault("show_default", True)
        super().__init__([flag], envvar=envvar, help=help, show_envvar=True, **kwargs)

    @property
    def flag(self) -> str:
        return self.opts[0]

    def source(self, ctx: click.Context) -> str:
        if ctx.get_parameter_source(self.name) == ParameterSource.ENVIRONMENT:
            return f"{self.flag} (from {self.envvar})"
        return self.flag

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        environ = ctx.obj if isinstance(ctx.obj, Mapping) else os.environ
        # An empty variable counts as unset, as compose passes `NAME=` for a blank .env line.
        return (environ.get(self.envvar) or None) if self.envvar else None


class Positional(OneLine, click.Argument):
    pass


class VersionNumber(Checked):
    def __init__(self) -> None:
        super().__init__("version", "a version number such as 3")

    def check(self, text: str) -> str | None:
        return str(int(text)) if text.isdigit() and int(text) >= 1 else None


TRACKING_URI = Setting("--tracking-uri", "MLFLOW_TRACKING_URI", type=TrackingUri(), default=None,
                       help="MLflow tracking server; credentials via MLFLOW_TRACKING_USERNAME/PASSWORD")
MODEL_NAME_SETTING = Setting("--model-name", "MODEL_NAME", default="fashion-mnist-cnn", help="registered model",
                             type=Matching("name", MODEL_NAME, "a registered model name without '/' or ':'"))
MODEL_ALIAS_SETTING = Setting("--model-alias", "MODEL_ALIAS", default="production",
                              help="alias that the serving container follows",
                              type=Matching("alias", ALIAS, "letters, digits, '_' or '-', not 'latest' or 'v<N>'",
                                            reserved=RESERVED_ALIAS))
DATA_DIR = Setting("--data-dir", "DATA_DIR", type=Directory(), default="./data",
                   help="FashionMNIST cache; torchvision's layout, DATA_DIR/FashionMNIST/raw")
CONNECT_TIMEOUT = Setting("--connect-timeout", "TRAINER_CONNECT_TIMEOUT", type=FiniteRange(0, 3600), default=60,
                          help="seconds to keep retrying an unreachable tracking server")

SETTINGS: tuple[Setting, ...] = (
    Setting("--epochs", "TRAINER_EPOCHS", type=click.IntRange(1, 10_000), default=10,
            help="passes over the training set"),
    Setting("--batch-size", "TRAINER_BATCH_SIZE", type=click.IntRange(2, 65_536), default=128,
            help="images per training step"),
    Setting("--lr", "TRAINER_LR", type=FiniteRange(0, 10, min_open=True), default=0.001, help="peak learning rate"),
    Setting("--optimizer", "TRAINER_OPTIMIZER", type=click.Choice(OPTIMIZERS), default="adamw",
            help="adamw (weight decay 0.01) or plain sgd as in MLflow's PyTorch quickstart"),
    Setting("--lr-schedule", "TRAINER_LR_SCHEDULE", type=click.Choice(LR_SCHEDULES), default="cosine",
            help="cosine decays the rate to zero over the run; constant keeps it"),
    Setting("--seed", "TRAINER_SEED", type=click.IntRange(0, 2**32 - 1), default=42,
            help="seeds weights, data order and dropout; same seed, same metrics on CPU"),
    Setting("--arch", "TRAINER_ARCH", type=click.Choice(ARCHITECTURES), default="small-cnn",
            help="small-cnn (2 conv + batch norm + pooling) or the quickstart's CNN"),
    Setting("--device", "TRAINER_DEVICE", type=click.Choice(DEVICES), default="auto",
            help="auto picks cuda when present"),
    DATA_DIR,
    Setting("--no-download", "TRAINER_NO_DOWNLOAD", is_flag=True, default=False,
            help="never download; fail with the list of files to place instead"),
    Setting("--max-train-samples", "TRAINER_MAX_TRAIN_SAMPLES", type=click.IntRange(0, 10_000_000), default=0,
            help="use only the first N training images (0: all), for smoke runs"),
    Setting("--max-test-samples", "TRAINER_MAX_TEST_SAMPLES", type=click.IntRange(0, 10_000_000), default=0,
            help="use only the first N test images (0: all), for smoke runs"),
    Setting("--log-every", "TRAINER_LOG_EVERY", type=click.IntRange(1, 1_000_000), default=50,
            help="steps between train loss/accuracy metrics and progress lines"),
    Setting("--no-tracking", "TRAINER_NO_TRACKING", is_flag=True, default=False,
            help="train without MLflow: no run, no checkpoints, no model (for benchmarks)"),
    TRACKING_URI,
    Setting("--experiment-name", "EXPERIMENT_NAME", type=Name(500), default="fashion-mnist", help="MLflow experiment"),
    Setting("--run-name", "TRAINER_RUN_NAME", type=Name(250, optional=True), default=None,
            help="run name (MLflow picks one if unset)"),
    MODEL_NAME_SETTING,
    MODEL_ALIAS_SETTING,
    Setting("--promotion-policy", "PROMOTION_POLICY", type=click.Choice(PROMOTION_POLICIES), default="if-better",
            help="if-better moves the alias only when eval accuracy beats the holder's"),
    CONNECT_TIMEOUT,
    Setting("--outage-timeout", "TRAINER_OUTAGE_TIMEOUT", type=FiniteRange(0, 86400), default=300,
            help="seconds to wait, mid-run, for a tracking server or artifact store that stopped answering"),
    Setting("--resume-from", "TRAINER_RESUME_FROM", default=None,
            type=Matching("run_id", RUN_ID, "a 32-character run id", optional=True),
            help="continue from the last checkpoint of this run, in a new run"),
    Setting("--nproc", "TRAINER_NPROC", type=click.IntRange(1, 1024), default=1,
            help="training processes on this node; above 1 (or with --nnodes) PyTorch's elastic launcher starts "
                 "them and they train one model with DDP"),
    Setting("--nnodes", "TRAINER_NNODES", type=click.IntRange(1, 1024), default=1,
            help="hosts taking part; each runs the same command with its own --node-rank"),
    Setting("--node-rank", "TRAINER_NODE_RANK", type=click.IntRange(0, 1023), default=0,
            help="this host's number, 0 to nnodes-1; node 0 hosts the rendezvous and creates the MLflow run"),
    Setting("--rdzv-endpoint", "TRAINER_RDZV_ENDPOINT", default=None,
            type=Matching("endpoint", ENDPOINT, "host or host:port", optional=True),
            help="node 0's rendezvous address, port 29400 if omitted; needed with --nnodes above 1"),
    Setting("--rdzv-id", "TRAINER_RDZV_ID", default=None,
            type=Matching("rdzv_id", RDZV_ID, "letters, digits, '_', '.' or '-', at most 128", optional=True),
            help="job id shared by every node; needed with --nnodes above 1 (one host: a fresh one)"),
    Setting("--rdzv-timeout", "TRAINER_RDZV_TIMEOUT", type=FiniteRange(1, 86400), default=300,
            help="seconds to wait for the rendezvous endpoint to answer and every node to join"),
    Setting("--max-restarts", "TRAINER_MAX_RESTARTS", type=click.IntRange(0, 100), default=0,
            help="times the launcher restarts all processes after one dies; they resume the same run"),
    Setting("--lr-scaling", "TRAINER_LR_SCALING", type=click.Choice(LR_SCALINGS), default="none",
            help="none keeps --lr whatever the process count; linear multiplies it by the number of processes"),
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

COMMAND = click.Command(
    "trainer", params=list(SETTINGS), context_settings=CONTEXT,
    help="Train a FashionMNIST classifier, log it to MLflow, register it and apply the promotion policy. "
         "Every flag defaults to the environment variable shown.",
    epilog="The last three lines printed are 'run: URL', 'version: N' and 'promoted: yes|no (reason)'. "
           "Exit status: 0 done, 1 failed, 2 bad configuration, 130/143 stopped by SIGINT/SIGTERM after saving "
           "a checkpoint. The logged model is signed with MODEL_SIGNING_KEY (a base64 PEM from 'make env'); "
           "tracked runs need it.")


def signing_key(environ: Mapping[str, str]) -> model_signatures.PrivateKey:
    try:
        return model_signatures.private_key_from_env(environ)
    except model_signatures.KeyProblem as error:
        raise ConfigError(str(error)) from None


def parse_args(command: click.Command, prog: str, argv: Sequence[str] | None,
               environ: Mapping[str, str]) -> click.Context:
    """click's parse of argv and environ; usage errors become ConfigError, --help click's Exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return command.make_context(prog, args, obj=environ)
    except click.UsageError as error:
        raise ConfigError(" ".join(error.format_message().split())) from None


def parse(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Return a checked Config, or raise ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    values = dict(parse_args(COMMAND, PROG, argv, environ).params)
    values["download"] = not values.pop("no_download")
    values["tracking"] = not values.pop("no_tracking")
    if values["resume_from"] and not values["tracking"]:
        raise ConfigError("--resume-from needs tracking: it reads the checkpoint from MLflow")
    if values["node_rank"] >= values["nnodes"]:
        raise ConfigError(f"--node-rank must be below --nnodes ({values['nnodes']}), got {values['node_rank']}")
    if values["nnodes"] > 1:
        for key, flag in (("rdzv_endpoint", "--rdzv-endpoint"), ("rdzv_id", "--rdzv-id")):
            if not values[key]:
                raise ConfigError(f"--nnodes {values['nnodes']} needs {flag}, the same on every node")
    if values["tracking"]:
        # Every logged model is signed; a run that could not sign its model is not started.
        values["signing_key"] = signing_key(environ)
    return Config(**values)


@contextmanager
def exit_on_bad_input(prog: str) -> Iterator[None]:
    """Exit 0 after --help, and 2 with one line on stderr for a bad value: never a traceback."""
    try:
        yield
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """The checked Config of `python -m trainer`, or exit as exit_on_bad_input says."""
    with exit_on_bad_input(PROG):
        return parse(argv, environ)


def options(command: click.Command, prog: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The values of a small tool's flags, from argv and the environment, or exit as load() does."""
    with exit_on_bad_input(prog):
        return dict(parse_args(command, prog, argv, os.environ).params)


def flag_table() -> str:
    """The flag table of trainer/README.md, from SETTINGS."""
    rows = ["| flag | variable | default | accepted | meaning |", "|---|---|---|---|---|"]
    for setting in SETTINGS:
        if setting.is_flag:
            default, must = "off", "flag; variable 1/0"
        else:
            default = "unset" if setting.default is None else f"`{setting.default}`"
            must = accepted(setting.type)
        rows.append(f"| `{setting.flag}` | `{setting.envvar}` | {default} | {must} | {setting.help} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flag_table(), end="")
