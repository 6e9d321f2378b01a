"""Flags of `python -m trainer`, each defaulting to an environment variable.

Compose passes settings as environment variables and a laptop user passes flags; both go
through the same checks. Every value is checked before MLflow is contacted, so a typo
costs one line on stderr and exit status 2, never a half-made run.
"""

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import model_signatures

ARCHITECTURES = ("small-cnn", "quickstart")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PROMOTION_POLICIES = ("if-better", "always", "never")

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# MLflow rejects '/' and ':' in model names; aliases are word characters and hyphens.
MODEL_NAME = re.compile(r"^[^/:\s][^/:]{0,254}$")
ALIAS = re.compile(r"^[\w-]{1,255}$")
RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)


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
    # From MODEL_SIGNING_KEY only (never a flag, which `ps` would show); None without tracking.
    signing_key: model_signatures.PrivateKey | None = None


# Each checker turns text into a value or raises ConfigError with the accepted range,
# which is also what --help shows.


def integer(low, high):
    def check(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise ConfigError(f"an integer from {low} to {high}")
        return value

    check.accepted = f"{low}..{high}"
    return check


def real(low, high, low_inclusive=True):
    def check(text):
        try:
            value = float(text)
        except ValueError:
            value = None
        bottom_ok = value is not None and (value >= low if low_inclusive else value > low)
        if not bottom_ok or not value <= high:
            bracket = "[" if low_inclusive else "("
            raise ConfigError(f"a number in {bracket}{low:g}, {high:g}]")
        return value

    check.accepted = f"{low:g} {'<=' if low_inclusive else '<'} value <= {high:g}"
    return check


def choice(*values):
    def check(text):
        if text not in values:
            raise ConfigError("one of " + ", ".join(values))
        return text

    check.accepted = "|".join(values)
    return check


def boolean(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError("a boolean (1/0, true/false, yes/no, on/off)")


def pattern(regex, description, reserved=None):
    def check(text):
        if not regex.match(text) or (reserved is not None and reserved.match(text)):
            raise ConfigError(description)
        return text

    check.accepted = description
    return check


def optional(check):
    def wrapped(text):
        return None if text == "" else check(text)

    wrapped.accepted = getattr(check, "accepted", "")
    return wrapped


def directory(text):
    if not text.strip():
        raise ConfigError("a directory path")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError("a directory path (this path is a file)")
    return path


directory.accepted = "a directory"


def tracking_uri(text):
    if text == "":
        return None
    scheme = text.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", text) else ""
    scheme = scheme.split("+", 1)[0]
    if scheme and scheme not in TRACKING_SCHEMES:
        raise ConfigError("a tracking URI (" + ", ".join(s + ":" for s in TRACKING_SCHEMES) + ")")
    if scheme in ("http", "https") and not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError("a tracking URI such as http://host:5000")
    return text


tracking_uri.accepted = "http(s)://host:port, sqlite:///file.db, ..."


def non_empty(limit):
    def check(text):
        if not text.strip() or len(text) > limit:
            raise ConfigError(f"a non-empty name of at most {limit} characters")
        return text

    check.accepted = f"1..{limit} characters"
    return check


@dataclass(frozen=True)
class Option:
    flag: str
    env: str | None
    default: str
    check: object
    help: str

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS = (
    Option("--epochs", "TRAINER_EPOCHS", "10", integer(1, 10_000), "passes over the training set"),
    Option("--batch-size", "TRAINER_BATCH_SIZE", "128", integer(2, 65_536), "images per training step"),
    Option("--lr", "TRAINER_LR", "0.001", real(0, 10, low_inclusive=False), "peak learning rate"),
    Option("--optimizer", "TRAINER_OPTIMIZER", "adamw", choice(*OPTIMIZERS),
           "adamw (weight decay 0.01) or plain sgd as in MLflow's PyTorch quickstart"),
    Option("--lr-schedule", "TRAINER_LR_SCHEDULE", "cosine", choice(*LR_SCHEDULES),
           "cosine decays the rate to zero over the run; constant keeps it"),
    Option("--seed", "TRAINER_SEED", "42", integer(0, 2**32 - 1),
           "seeds weights, data order and dropout; same seed, same metrics on CPU"),
    Option("--arch", "TRAINER_ARCH", "small-cnn", choice(*ARCHITECTURES),
           "small-cnn (2 conv + batch norm + pooling) or the quickstart's CNN"),
    Option("--device", "TRAINER_DEVICE", "auto", choice(*DEVICES), "auto picks cuda when present"),
    Option("--data-dir", "DATA_DIR", "./data", directory,
           "FashionMNIST cache; torchvision's layout, DATA_DIR/FashionMNIST/raw"),
    Option("--no-download", "TRAINER_NO_DOWNLOAD", "0", boolean,
           "never download; fail with the list of files to place instead"),
    Option("--max-train-samples", "TRAINER_MAX_TRAIN_SAMPLES", "0", integer(0, 10_000_000),
           "use only the first N training images (0: all), for smoke runs"),
    Option("--max-test-samples", "TRAINER_MAX_TEST_SAMPLES", "0", integer(0, 10_000_000),
           "use only the first N test images (0: all), for smoke runs"),
    Option("--log-every", "TRAINER_LOG_EVERY", "50", integer(1, 1_000_000),
           "steps between train loss/accuracy metrics and progress lines"),
    Option("--no-tracking", "TRAINER_NO_TRACKING", "0", boolean,
           "train without MLflow: no run, no checkpoints, no model (for benchmarks)"),
    Option("--tracking-uri", "MLFLOW_TRACKING_URI", "", tracking_uri,
           "MLflow tracking server; credentials via MLFLOW_TRACKING_USERNAME/PASSWORD"),
    Option("--experiment-name", "EXPERIMENT_NAME", "fashion-mnist", non_empty(500), "MLflow experiment"),
    Option("--run-name", "TRAINER_RUN_NAME", "", optional(non_empty(250)), "run name (MLflow picks one if empty)"),
    Option("--model-name", "MODEL_NAME", "fashion-mnist-cnn",
           pattern(MODEL_NAME, "a registered model name without '/' or ':'"), "registered model"),
    Option("--model-alias", "MODEL_ALIAS", "production",
           pattern(ALIAS, "letters, digits, '_' or '-', not 'latest' or 'v<N>'", RESERVED_ALIAS),
           "alias that the serving container follows"),
    Option("--promotion-policy", "PROMOTION_POLICY", "if-better", choice(*PROMOTION_POLICIES),
           "if-better moves the alias only when eval accuracy beats the holder's"),
    Option("--connect-timeout", "TRAINER_CONNECT_TIMEOUT", "60", real(0, 3600),
           "seconds to keep retrying an unreachable tracking server"),
    Option("--outage-timeout", "TRAINER_OUTAGE_TIMEOUT", "300", real(0, 86400),
           "seconds to wait, mid-run, for a tracking server or artifact store that stopped answering"),
    Option("--resume-from", "TRAINER_RESUME_FROM", "", optional(pattern(RUN_ID, "a 32-character run id")),
           "continue from the last checkpoint of this run, in a new run"),
)

BOOLEAN_FLAGS = {"--no-download", "--no-tracking"}


class OneLineParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # Prefix matching would take --epoch for --epochs; a typo should be an error.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse prints usage plus an error; one line is easier to spot in compose logs.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def accepted(option):
    if option.check is boolean:
        return "env value 1/0, true/false, yes/no"
    return getattr(option.check, "accepted", "")


def build_parser(environ):
    parser = OneLineParser(
        prog="python -m trainer",
        description="Train a FashionMNIST classifier, log it to MLflow, register it and apply "
        "the promotion policy. Every flag defaults to the environment variable shown.",
        epilog="The last three lines printed are 'run: URL', 'version: N' and "
        "'promoted: yes|no (reason)'. Exit status: 0 done, 1 failed, 2 bad configuration, "
        "130/143 stopped by SIGINT/SIGTERM after saving a checkpoint. The logged model is "
        "signed with MODEL_SIGNING_KEY (a base64 PEM from 'make env'); tracked runs need it.",
    )
    for option in OPTIONS:
        current = environ.get(option.env, option.default) if option.env else option.default
        shown = current if current != "" else "unset"
        help_text = f"{option.help} ({accepted(option)}; env {option.env}={shown})"
        if option.flag in BOOLEAN_FLAGS:
            parser.add_argument(option.flag, action="store_const", const="1", default=None,
                                dest=option.dest, help=help_text)
        else:
            parser.add_argument(option.flag, default=None, dest=option.dest,
                                metavar=option.dest.upper(), help=help_text)
    return parser


def parse(argv=None, environ=None):
    """Return a checked Config, or raise ConfigError with a one-line message."""
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    values = {}
    for option in OPTIONS:
        given = getattr(args, option.dest)
        source = option.flag
        if given is None:
            given = environ.get(option.env, option.default) if option.env else option.default
            if option.env in environ:
                source = f"{option.flag} (from {option.env})"
        try:
            values[option.dest] = option.check(given)
        except ConfigError as error:
            raise ConfigError(f"{source} must be {error}, got {given!r}") from None
    values["download"] = not values.pop("no_download")
    values["tracking"] = not values.pop("no_tracking")
    if values["resume_from"] and not values["tracking"]:
        raise ConfigError("--resume-from needs tracking: it reads the checkpoint from MLflow")
    if values["tracking"]:
        # Every logged model is signed; a run that could not sign its model is not started.
        try:
            values["signing_key"] = model_signatures.private_key_from_env(environ)
        except model_signatures.KeyProblem as error:
            raise ConfigError(str(error)) from None
    return Config(**values)


def load(argv=None, environ=None):
    """Parse flags or exit with status 2 and one line on stderr."""
    try:
        return parse(argv, environ)
    except ConfigError as error:
        print(f"python -m trainer: error: {error}", file=sys.stderr)
        sys.exit(2)
