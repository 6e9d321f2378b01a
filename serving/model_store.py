"""One registered model version: find it, download it into the cache, verify it, load it.

Several gunicorn workers share one cache directory and may fetch the same version at the
same moment, so each download lands in a private directory that is verified there and only
then renamed into place: a version directory either does not exist or is complete and
verified, and no worker ever reads a copy another worker is refusing.

Nothing is loaded that was not verified first, from the cache as well as fresh: the model
directory must carry a signature made with the trainer's key over exactly its files, a
provenance record naming the version the registry resolved, and the trainer's loader
(model_signatures). MLflow's loader runs the model's code, so it runs only after that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

import model_signatures
from stack_common.registry import alias_missing

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.pyfunc import PyFuncModel
    from mlflow.types import TensorSpec

log = logging.getLogger("serving")

# Versions kept on disk besides the one being served: enough to switch back quickly after
# a rollback, few enough that a tmpfs cache does not grow with every training run.
KEEP_OLD_VERSIONS = 2
# A private download directory older than this belongs to a worker that died mid-download.
STALE_PARTIAL_SECONDS = 3600


class AliasNotFound(Exception):
    """The registered model or its alias does not exist (yet)."""


@dataclass(frozen=True)
class VersionRef:
    """What the alias points at. The creation time tells apart two "version 1"s of a
    registered model that was deleted and created again."""

    name: str
    version: str
    run_id: str | None = None
    created_ms: int = 0
    model_id: str | None = None  # the logged model the version was registered from
    # The version's tags as last read (rollout settings ride on them); not part of what
    # the version is, so a tag change never reloads it.
    tags: dict[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def cache_key(self) -> str:
        return f"v{self.version}-{self.created_ms}"


@dataclass
class LoadedModel:
    """A model in memory, ready to answer: what requests are scored with."""

    ref: VersionRef
    path: str
    pyfunc: PyFuncModel
    scoring_app: object  # MLflow's own scoring server (FastAPI) for this model
    input_spec: TensorSpec | None  # the single TensorSpec input, when the signature has one
    loaded_at: float = field(default_factory=time.time)
    batchable: bool = False  # set once rows_score_independently() has said so
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.headers = [
            (b"x-model-name", self.ref.name.encode("latin-1", "replace")),
            (b"x-model-version", self.ref.version.encode("latin-1", "replace")),
        ]


def resolve_alias(registry: MlflowClient, name: str, alias: str) -> VersionRef:
    """Ask the registry which version the alias points at."""
    try:
        mv = registry.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if alias_missing(e):
            raise AliasNotFound(e.message) from None
        raise
    return VersionRef(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        created_ms=int(mv.creation_timestamp or 0),
        model_id=model_signatures.logged_model_id(mv),
        tags=dict(mv.tags or {}),
    )


def input_tensor_spec(pyfunc: PyFuncModel) -> TensorSpec | None:
    """The one unnamed tensor input of the signature, or None for any other signature."""
    schema = pyfunc.metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return None
    if schema.has_input_names():
        return None
    return schema.inputs[0]


class ModelStore:
    """Downloads versions into SERVING_CACHE_DIR/<model>/<version>-<created> and loads them."""

    def __init__(self, cache_dir: str, tracking_uri: str, registry: MlflowClient,
                 public_key: model_signatures.PublicKey) -> None:
        self.cache_dir = cache_dir
        self.tracking_uri = tracking_uri
        self.registry = registry
        self.public_key = public_key

    def model_dir(self, name: str) -> str:
        return os.path.join(self.cache_dir, re.sub(r"[^\w.\-]", "_", name))

    def cached(self, ref: VersionRef) -> str | None:
        """The cache directory of ref if a verified copy was put there (verify it again to use it)."""
        path = os.path.join(self.model_dir(ref.name), ref.cache_key)
        return path if os.path.isdir(path) else None

    def fetch(self, ref: VersionRef) -> str:
        """Local directory of the version: the cached one if another worker already verified
        it, else a private download that verify() puts in the cache."""
        base = self.model_dir(ref.name)
        final = os.path.join(base, ref.cache_key)
        if os.path.isdir(final):
            os.utime(final)  # marks it recently used, for prune()
            return final
        os.makedirs(base, mode=0o700, exist_ok=True)
        # MLflow resolves a models:/NAME/VERSION URI through its global registry URI, not
        # the one it is given; asking our own client for the version's artifact location
        # keeps every call on the configured server.
        source = self.registry.get_model_version_download_uri(ref.name, ref.version)
        partial = tempfile.mkdtemp(prefix=f".partial-{ref.cache_key}-", dir=base)
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source,
                dst_path=partial,
                tracking_uri=self.tracking_uri,
                registry_uri=self.tracking_uri,
            )
            if not os.path.isfile(os.path.join(local, "MLmodel")):
                raise RuntimeError(f"no MLmodel file in what {source} holds")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return local

    def verify(self, ref: VersionRef, path: str) -> str:
        """The cached directory of ref once the files at path are verified for it; raises
        model_signatures.Refused otherwise, and the refused copy is dropped so that a retry
        downloads it again (e.g. after `make sign`)."""
        expected = model_signatures.Provenance(registered_model=ref.name, run_id=ref.run_id,
                                               model_id=ref.model_id)
        final = os.path.join(self.model_dir(ref.name), ref.cache_key)
        private = path != final
        try:
            model_signatures.verify(path, self.public_key, expected)
        except model_signatures.Refused:
            self._drop(path if private else self._set_aside(final))
            raise
        if not private:
            return final
        try:
            os.rename(path, final)
        except OSError:
            if not os.path.isdir(final):
                raise
            # Another worker verified the same version first; its copy is as good.
        finally:
            self._drop(path)
        return final

    def _set_aside(self, path: str) -> str:
        """Move a cached copy out of the cache in one step, so no worker starts reading it."""
        aside = tempfile.mkdtemp(prefix=".partial-refused-", dir=os.path.dirname(path))
        with contextlib.suppress(FileNotFoundError):  # another worker set it aside first
            os.rename(path, os.path.join(aside, "copy"))
        return aside

    @staticmethod
    def _drop(path: str) -> None:
        # A private download lives in .partial-*/<artifact dir>; remove the whole .partial-*.
        while os.path.basename(os.path.dirname(path)).startswith(".partial-"):
            path = os.path.dirname(path)
        shutil.rmtree(path, ignore_errors=True)

    def load(self, ref: VersionRef, path: str) -> LoadedModel:
        """Load a verified version. Its code runs here, and must leave its directory as
        signed: no bytecode cache is written beside it."""
        sys.dont_write_bytecode = True
        pyfunc = mlflow.pyfunc.load_model(path)
        return LoadedModel(
            ref=ref,
            path=path,
            pyfunc=pyfunc,
            scoring_app=scoring_server.init(pyfunc),
            input_spec=input_tensor_spec(pyfunc),
        )

    def prune(self, name: str, in_use: set[str]) -> None:
        """Remove all but the newest few versions of a model, never one in use."""
        base = self.model_dir(name)
        try:
            entries = [os.path.join(base, n) for n in os.listdir(base)]
        except FileNotFoundError:
            return
        now = time.time()
        versions = []
        for path in entries:
            try:
                mtime = os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if os.path.basename(path).startswith(".partial-"):
                if now - mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            elif path not in in_use:
                versions.append((mtime, path))
        versions.sort(reverse=True)
        for _, path in versions[KEEP_OLD_VERSIONS:]:
            log.info("removing cached model %s", path)
            shutil.rmtree(path, ignore_errors=True)
