"""python -m trainer.models: list registered versions, promote one, roll back the alias,
sign a version logged before models were signed.

    python -m trainer.models list
    python -m trainer.models promote VERSION
    python -m trainer.models rollback
    python -m trainer.models sign VERSION      (needs MODEL_SIGNING_KEY)

The tracking server, model name and alias come from the same flags and environment
variables as training (MLFLOW_TRACKING_URI, MODEL_NAME, MODEL_ALIAS). Unknown versions and
an empty rollback history exit with status 2 and one line on stderr.
"""

import argparse
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import model_signatures
from trainer import config as cfg
from trainer import registry, tracking

EXIT_FAILED = 1
EXIT_USAGE = 2


def parse(argv, environ):
    parser = cfg.OneLineParser(prog="python -m trainer.models",
                         description="Registered versions of the trained model and its serving alias.")
    options = {o.flag: o for o in cfg.OPTIONS}

    def add_common(p):
        for flag in ("--tracking-uri", "--model-name", "--model-alias", "--connect-timeout"):
            option = options[flag]
            shown = environ.get(option.env, option.default) or "unset"
            p.add_argument(flag, dest=option.dest, default=None, metavar=option.dest.upper(),
                           help=f"{option.help} [env {option.env}={shown}]")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_common(commands.add_parser("list", help="versions with run, eval accuracy, creation time and alias"))
    promote = commands.add_parser("promote", help="move the alias to VERSION")
    promote.add_argument("version", metavar="VERSION", help="version number to promote")
    add_common(promote)
    add_common(commands.add_parser("rollback", help="give the alias back to its previous holder"))
    sign = commands.add_parser("sign", help="sign VERSION as it is stored now (you vouch for its files)")
    sign.add_argument("version", metavar="VERSION", help="version number to sign")
    add_common(sign)
    args = parser.parse_args(argv)

    values = {}
    for flag in ("--tracking-uri", "--model-name", "--model-alias", "--connect-timeout"):
        option = options[flag]
        given = getattr(args, option.dest)
        source = flag if given is not None else f"{flag} (from {option.env})"
        if given is None:
            given = environ.get(option.env, option.default)
        try:
            values[option.dest] = option.check(given)
        except cfg.ConfigError as error:
            raise cfg.ConfigError(f"{source} must be {error}, got {given!r}") from None
    if args.command in ("promote", "sign"):
        if not args.version.isdigit() or int(args.version) < 1:
            raise cfg.ConfigError(f"VERSION must be a version number such as 3, got {args.version!r}")
        values["version"] = str(int(args.version))
    if args.command == "sign":
        try:
            values["signing_key"] = model_signatures.private_key_from_env(environ)
        except model_signatures.KeyProblem as error:
            raise cfg.ConfigError(str(error)) from None
    values["command"] = args.command
    return argparse.Namespace(**values)


def created(timestamp_ms):
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def list_versions(name, alias):
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - MLflow raises RestException or MlflowException
        raise registry.RegistryError(f"no registered model named {name!r} yet: train one first") from None
    holders = {}
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
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if alias not in (model.aliases or {}):
        print(f"(no version holds @{alias})")


def sign_version(name, version, key):
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


def main(argv=None, environ=None):
    environ = os.environ if environ is None else environ
    try:
        args = parse(argv, environ)
    except cfg.ConfigError as error:
        print(f"python -m trainer.models: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tracking.connect(args.tracking_uri, args.connect_timeout,
                         log=lambda *a, **k: print(*a, file=sys.stderr))
        if args.command == "list":
            list_versions(args.model_name, args.model_alias)
        elif args.command == "promote":
            previous = registry.promote(args.model_name, args.model_alias, args.version)
            was = f"was version {previous}" if previous else "was unset"
            print(f"{args.model_name}@{args.model_alias} -> version {args.version} ({was})")
        elif args.command == "sign":
            sign_version(args.model_name, args.version, args.signing_key)
            print(f"{args.model_name} version {args.version} signed")
        else:
            left, target = registry.rollback(args.model_name, args.model_alias)
            was = f"rolled back from version {left}" if left else "alias was unset"
            print(f"{args.model_name}@{args.model_alias} -> version {target} ({was})")
    except registry.RegistryError as error:
        print(f"python -m trainer.models: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except tracking.TrackingUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
