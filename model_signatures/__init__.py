"""Signed models: the trainer signs the files of every model it logs, serving verifies them.

A model directory carries two files besides the model:

    provenance.json   which registered model, run and logged model the files were made for
    model.sig         an OpenSSF model-signing signature (a Sigstore bundle, ECDSA key)
                      over the SHA-256 of every file in the directory, provenance.json
                      included, model.sig itself excluded

The trainer signs with log_signed_model, on the files it wrote, before they are uploaded.
Serving refuses a version before MLflow reads a byte of it (verify) unless the signature
verifies with the public key, the provenance names the version the registry resolved,
and the MLmodel asks for the one loader the trainer writes (a models-from-code pyfunc).
Both images ship this package; the keys come from .env as one base64 line each.

Imports of model_signing, cryptography and yaml are deferred, so that configuration
checks importing this module stay quick.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from mlflow.entities.model_registry import ModelVersion
    from model_signing import hashing

SIGNATURE_FILE = "model.sig"
PROVENANCE_FILE = "provenance.json"
# The only loader serving runs: MLflow's pyfunc for a PythonModel defined in a code file.
PYFUNC_LOADER = "mlflow.pyfunc.loaders.code_model"
CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts


class KeyProblem(ValueError):
    """A signing or public key that cannot be used; the message is one line for the operator."""


class Refused(Exception):
    """A model that must not be loaded. `reason` is in our own words, fit for /status;
    `detail` (library messages, file names) is for the log only."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


@dataclass(frozen=True)
class Provenance:
    registered_model: str
    run_id: str | None
    model_id: str | None

    def as_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True, indent=2) + "\n"


@dataclass(frozen=True, repr=False)
class PrivateKey:
    pem: bytes

    def __repr__(self) -> str:  # never the key itself, wherever a Config is printed
        return "PrivateKey(<hidden>)"


@dataclass(frozen=True)
class PublicKey:
    pem: bytes


def logged_model_id(version: ModelVersion) -> str | None:
    """The logged model whose files a registered version serves: its model_id, or the id in
    its models:/<id> source (a version created from that URI without model_id)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = getattr(version, "source", None) or ""
    if source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


def _pem_from_base64(text: str, name: str) -> bytes:
    text = (text or "").strip()
    if not text:
        raise KeyProblem(f"{name} is not set; run 'make env' (it writes the model signing key pair)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProblem(f"{name} is not valid: expected a PEM key as one base64 line") from None


def _check_curve(key: PrivateKey | PublicKey, name: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in CURVES:
        raise KeyProblem(f"{name} is not valid: expected an ECDSA key on P-256, P-384 or P-521")


def private_key_from_env(environ: Mapping[str, str], name: str = "MODEL_SIGNING_KEY") -> PrivateKey:
    from cryptography.hazmat.primitives import serialization

    pem = _pem_from_base64(environ.get(name, ""), name)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyProblem(f"{name} is not valid: expected an unencrypted PEM private key "
                         "as one base64 line") from None
    _check_curve(key.public_key(), name)
    return PrivateKey(pem)


def public_key_from_env(environ: Mapping[str, str], name: str = "MODEL_SIGNING_PUBLIC_KEY") -> PublicKey:
    from cryptography.hazmat.primitives import serialization

    pem = _pem_from_base64(environ.get(name, ""), name)
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise KeyProblem(f"{name} is not valid: expected a PEM public key as one base64 line") from None
    _check_curve(key, name)
    return PublicKey(pem)


def _hashing_config() -> hashing.Config:
    # The same on both sides, never taken from the signature: SHA-256 of every file,
    # symbolic links refused, nothing ignored but the signature itself (model-signing
    # would otherwise skip .git* paths).
    from model_signing import hashing

    return (hashing.Config()
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=False))


def _key_file(directory: str, pem: bytes) -> str:
    # model-signing reads keys from files only: a private one, in a private directory
    # that is removed as soon as the key has been read.
    path = os.path.join(directory, "key.pem")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def sign(model_dir: str | Path, key: PrivateKey, provenance: Provenance) -> None:
    """Write provenance.json into model_dir, then model.sig over every file there."""
    from model_signing import signing

    model_dir = Path(model_dir)
    (model_dir / PROVENANCE_FILE).write_text(provenance.as_json())
    with tempfile.TemporaryDirectory(prefix="model-signing-") as private:
        config = signing.Config().use_elliptic_key_signer(private_key=_key_file(private, key.pem))
    config.set_hashing_config(_hashing_config()).sign(model_dir, model_dir / SIGNATURE_FILE)


def check_loader(model_dir: str | Path) -> None:
    """Refuse an MLmodel that asks for any loader but the trainer's: python_function through
    mlflow.pyfunc.model with a models-from-code file, no pickled model, no extra code paths."""
    import yaml

    try:
        meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise Refused("its MLmodel file cannot be read", f"MLmodel: {error}") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        raise Refused("it is not a python_function model as the trainer logs them",
                      f"flavors: {sorted(flavors) if isinstance(flavors, dict) else flavors!r}")
    conf = flavors["python_function"]
    if not isinstance(conf, dict):
        raise Refused("it is not a python_function model as the trainer logs them", f"python_function: {conf!r}")
    if conf.get("python_model") is not None:
        raise Refused("it holds a pickled Python model, which this stack does not load",
                      f"python_model: {conf['python_model']!r}")
    if conf.get("loader_module") != PYFUNC_LOADER:
        raise Refused("it asks for a loader that this stack does not run",
                      f"loader_module: {conf.get('loader_module')!r}")
    if conf.get("code") is not None or conf.get("data") is not None:
        raise Refused("it adds code or data paths that this stack does not load",
                      f"code: {conf.get('code')!r}, data: {conf.get('data')!r}")
    code = conf.get("model_code_path")
    if not isinstance(code, str) or not code.endswith(".py"):
        raise Refused("it has no model code file as the trainer logs it", f"model_code_path: {code!r}")
    # MLflow runs the file of that name at the top of the model directory.
    if not (Path(model_dir) / os.path.basename(code)).is_file():
        raise Refused("its model code file is missing", f"model_code_path: {code!r}")


def _check_signature(model_dir: Path, key: PublicKey) -> None:
    from model_signing import verifying

    if not (model_dir / SIGNATURE_FILE).is_file():
        raise Refused("it is not signed", f"no {SIGNATURE_FILE} in the model directory")
    with tempfile.TemporaryDirectory(prefix="model-verifying-") as private:
        config = verifying.Config().use_elliptic_key_verifier(public_key=_key_file(private, key.pem))
    try:
        config.set_hashing_config(_hashing_config()).verify(model_dir, model_dir / SIGNATURE_FILE)
    except Exception as error:  # noqa: BLE001 - the library raises many kinds; each one refuses
        detail = f"{type(error).__name__}: {' '.join(str(error).split())[:2000]}"
        if str(error).startswith("Signature mismatch"):
            raise Refused("its files differ from the files that were signed", detail) from None
        raise Refused("its signature does not verify with this stack's public key", detail) from None


def _read_provenance(model_dir: Path) -> dict:
    try:
        found = json.loads((model_dir / PROVENANCE_FILE).read_text())
    except (OSError, ValueError) as error:
        raise Refused("its provenance record cannot be read", f"{PROVENANCE_FILE}: {error}") from None
    if not isinstance(found, dict):
        raise Refused("its provenance record cannot be read", f"{PROVENANCE_FILE}: not an object")
    return found


def verify(model_dir: str | Path, key: PublicKey, expected: Provenance) -> None:
    """Raise Refused unless model_dir is signed with `key`, unchanged since, made for
    `expected` (what the registry says about the version), and loads with our loader."""
    model_dir = Path(model_dir)
    _check_signature(model_dir, key)
    found = _read_provenance(model_dir)
    # The registry hides a version's run from an account that may not read runs (serving's),
    # so an unknown run id is not compared; the logged model id alone names one model's files.
    wanted = {k: v for k, v in vars(expected).items() if not (k == "run_id" and v is None)}
    anchored = wanted.get("model_id") or wanted.get("run_id")
    if not anchored or {k: found.get(k) for k in wanted} != wanted or set(found) - set(vars(expected)):
        raise Refused("it was signed for another model version",
                      f"provenance {found} != registry {vars(expected)}")
    check_loader(model_dir)


def log_signed_model(save: Callable[[str], object], name: str, registered_model: str, key: PrivateKey,
                     run_id: str | None = None) -> str:
    """Log a model whose files are signed before they leave this machine; return its URI.

    mlflow.pyfunc.log_model saves and uploads in one call, with no moment in between to
    sign. These are the steps it takes, through MLflow's public API: create the logged
    model, let save(path, mlflow_model) write the directory (e.g. mlflow.pyfunc.save_model),
    sign it for registered_model, upload it, link it to the run, mark it READY.
    """
    import shutil

    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run_id = run_id or mlflow.active_run().info.run_id
    client = mlflow.MlflowClient()
    # In the run's experiment, whichever experiment is active in this process.
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=experiment_id)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            save(str(local), Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                                   run_id=run_id, model_id=logged.model_id))
            # Saving imports the model's code; a bytecode cache must not become part of it.
            for cache in list(local.rglob("__pycache__")):
                shutil.rmtree(cache)
            sign(local, key, Provenance(registered_model=registered_model, run_id=run_id,
                                        model_id=logged.model_id))
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"
