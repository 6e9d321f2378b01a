"""python -m trainer.registry_cli: list registered versions, promote one, roll back the alias,
sign a version logged before models were signed.

    python -m trainer.registry_cli list
    python -m trainer.registry_cli promote VERSION     (also ends a rollout of VERSION)
    python -m trainer.registry_cli rollback
    python -m trainer.registry_cli canary VERSION --percent 10
    python -m trainer.registry_cli shadow VERSION [--percent 100]
    python -m trainer.registry_cli abort                (ends the canary or shadow)
    python -m trainer.registry_cli sign VERSION      (needs MODEL_SIGNING_KEY)

The tracking server, model name and alias come from the same flags and environment
variables as training (MLFLOW_TRACKING_URI, MODEL_NAME, MODEL_ALIAS); the challenger alias
of rollouts from --challenger-alias or CHALLENGER_ALIAS, as serving reads it. Unknown versions and
an empty rollback history exit with status 2 and one line on stderr.
"""

import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import click
import mlflow
from mlflow.tracking import MlflowClient

import model_signatures
from trainer import config, registry, tracking

PROG = "python -m trainer.registry_cli"
EXIT_FAILED = 1
EXIT_USAGE = 2
# The same declarations as training's flags, so both read the same variables the same way.
COMMON = (config.TRACKING_URI, config.MODEL_NAME_SETTING, config.MODEL_ALIAS_SETTING, config.CONNECT_TIMEOUT)


def command(name: str, help_text: str, *arguments: click.Argument) -> Callable[[Callable], click.Command]:
    """A subcommand taking `arguments` and the common flags; its callback receives them all."""

    def declare(callback: Callable) -> click.Command:
        return click.Command(name, callback=callback, params=[*arguments, *COMMON], help=help_text,
                             context_settings=config.CONTEXT)

    return declare


VERSION = config.Positional(["version"], metavar="VERSION", type=config.VersionNumber())
CHALLENGER_ALIAS = config.Setting(
    "--challenger-alias", "CHALLENGER_ALIAS", default="challenger",
    help="alias of the canary or shadow version, served beside the alias",
    type=config.Matching("alias", config.ALIAS, "letters, digits, '_' or '-', not 'latest' or 'v<N>'",
                         reserved=config.RESERVED_ALIAS))


def percent_option(default: float, meaning: str) -> config.Setting:
    return config.Setting("--percent", None, type=click.FloatRange(0, 100, min_open=True), default=default,
                          help=meaning)


def connect(tracking_uri: str | None, connect_timeout: float) -> None:
    tracking.connect(tracking_uri, connect_timeout, log=lambda *a, **k: print(*a, file=sys.stderr))


@command("list", "versions with run, eval accuracy, creation time and alias")
def list_command(tracking_uri: str | None, model_name: str, model_alias: str, connect_timeout: float) -> None:
    connect(tracking_uri, connect_timeout)
    list_versions(model_name, model_alias)


@command("promote", "move the alias to VERSION (and end a canary or shadow of it)", VERSION, CHALLENGER_ALIAS)
def promote_command(version: str, challenger_alias: str, tracking_uri: str | None, model_name: str,
                    model_alias: str, connect_timeout: float) -> None:
    if challenger_alias == model_alias:
        raise click.UsageError(f"--challenger-alias must differ from --model-alias ({model_alias})")
    connect(tracking_uri, connect_timeout)
    previous = registry.promote(model_name, model_alias, version, challenger_alias)
    was = f"was version {previous}" if previous else "was unset"
    print(f"{model_name}@{model_alias} -> version {version} ({was})")


def start_rollout(mode: str, version: str, percent: float, challenger_alias: str, tracking_uri: str | None,
                  model_name: str, model_alias: str, connect_timeout: float) -> None:
    if challenger_alias == model_alias:
        raise click.UsageError(f"--challenger-alias must differ from --model-alias ({model_alias})")
    connect(tracking_uri, connect_timeout)
    replaced = registry.start_rollout(model_name, model_alias, challenger_alias, version, mode, percent)
    share = f"{percent:g}% of requests" + (" scored in the background" if mode == "shadow" else "")
    ended = f"; version {replaced}'s rollout ended" if replaced else ""
    print(f"{model_name}@{challenger_alias} -> version {version}: {mode}, {share}{ended}")


@command("canary", "answer a share of requests with VERSION beside the alias", VERSION,
         percent_option(10, "share of requests VERSION answers"), CHALLENGER_ALIAS)
def canary_command(version: str, percent: float, challenger_alias: str, **common: object) -> None:
    start_rollout("canary", version, percent, challenger_alias, **common)


@command("shadow", "also score requests with VERSION in the background; clients get the alias's answers",
         VERSION, percent_option(100, "share of requests VERSION also scores"), CHALLENGER_ALIAS)
def shadow_command(version: str, percent: float, challenger_alias: str, **common: object) -> None:
    start_rollout("shadow", version, percent, challenger_alias, **common)


@command("abort", "end the canary or shadow: the alias's version answers everything", CHALLENGER_ALIAS)
def abort_command(challenger_alias: str, tracking_uri: str | None, model_name: str, model_alias: str,
                  connect_timeout: float) -> None:
    connect(tracking_uri, connect_timeout)
    version, removed = registry.abort_rollout(model_name, challenger_alias)
    if removed:
        print(f"{model_name}@{challenger_alias} removed: rollout of version {version} aborted")
    else:
        print(f"rollout of version {version} aborted: serving no longer routes to it; @{challenger_alias} stays on "
              "it (removing an alias needs MANAGE on the model, which this account lacks)")


@command("rollback", "give the alias back to its previous holder")
def rollback_command(tracking_uri: str | None, model_name: str, model_alias: str, connect_timeout: float) -> None:
    connect(tracking_uri, connect_timeout)
    left, target = registry.rollback(model_name, model_alias)
    was = f"rolled back from version {left}" if left else "alias was unset"
    print(f"{model_name}@{model_alias} -> version {target} ({was})")


@command("sign", "sign VERSION as it is stored now (you vouch for its files); needs MODEL_SIGNING_KEY", VERSION)
def sign_command(version: str, tracking_uri: str | None, model_name: str, model_alias: str,
                 connect_timeout: float) -> None:
    # The secret comes from the environment only, and is checked before anything is contacted.
    key = config.signing_key(click.get_current_context().obj)
    connect(tracking_uri, connect_timeout)
    sign_version(model_name, version, key)
    print(f"{model_name} version {version} signed")


CLI = click.Group("registry", commands=[list_command, promote_command, rollback_command, sign_command,
                                        canary_command, shadow_command, abort_command],
                  help="Registered versions of the trained model and its serving alias.",
                  # Without a command: one line saying so, not the help text as an error.
                  no_args_is_help=False, context_settings=config.CONTEXT)


def created(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_versions(name: str, alias: str) -> None:
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException or MlflowException
        raise registry.RegistryError(f"no registered model named {name!r} yet: train one first") from None
    holders: dict[str, list[str]] = {}
    for alias_name, version in (model.aliases or {}).items():
        holders.setdefault(str(version), []).append("@" + alias_name)
    rows = [("version", "run_id", "eval_accuracy", "created (UTC)", "aliases")]
    for version in registry.versions(client, name):
        accuracy = registry.accuracy(version)
        rows.append((str(version.version), version.run_id or "-",
                     f"{accuracy:.4f}" if accuracy is not None else "-",
                     created(version.creation_timestamp),
                     " ".join(sorted(holders.get(str(version.version), []))) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if alias not in (model.aliases or {}):
        print(f"(no version holds @{alias})")


def sign_version(name: str, version: str, key: model_signatures.PrivateKey) -> None:
    """Sign the files a version holds now, for that version; upload the signature beside them."""
    client = MlflowClient()
    target = registry.get_version(client, name, version)
    model_id = model_signatures.logged_model_id(target)
    if not model_id:
        raise registry.RegistryError(f"version {version} is not stored as a logged model, so it cannot be "
                                     "signed in place; train it again")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version), dst_path=tmp))
        try:
            # Only the loader this stack writes: signing anything else would let its code run.
            model_signatures.check_loader(local)
        except model_signatures.Refused as refused:
            raise registry.RegistryError(f"version {version} not signed: {refused.reason} ({refused.detail})") from None
        model_signatures.sign(local, key, model_signatures.Provenance(
            registered_model=name, run_id=target.run_id or None, model_id=model_id))
        for file_name in (model_signatures.PROVENANCE_FILE, model_signatures.SIGNATURE_FILE):
            client.log_model_artifact(model_id, str(local / file_name))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one command; return the exit status (2 with one line on stderr for bad input)."""
    environ = os.environ if environ is None else environ
    # Each command answers in a line or a table; MLflow's download progress bars (drawn
    # whenever tqdm is installed) would bury it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        CLI.main(args, prog_name=PROG, standalone_mode=False, obj=environ)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.UsageError as error:
        print(f"{PROG}: error: {' '.join(error.format_message().split())}", file=sys.stderr)
        return EXIT_USAGE
    except (config.ConfigError, registry.RegistryError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except tracking.TrackingUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
