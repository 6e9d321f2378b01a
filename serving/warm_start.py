"""The version a worker last served, remembered beside the model cache, so that a restarted
container answers with it as soon as its workers start instead of waiting for the registry.

The record only says which version to look for. What is loaded is the cached copy, and
only after the same verification as any other (signature over exactly its files,
provenance for that version), so a damaged or altered cache is refused, set aside and
downloaded again once the registry names the version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.model_store import VersionRef

log = logging.getLogger("serving")

_FIELDS = ("version", "run_id", "created_ms", "model_id")


def record_path(cache_dir: str, name: str, alias: str) -> str:
    # Beside the model directories, not in one: prune() counts every entry there as a version.
    safe = re.sub(r"[^\w.\-]", "_", f"{name}@{alias}")
    return os.path.join(cache_dir, f"{safe}.last-served.json")


def remember(cache_dir: str, alias: str, ref: VersionRef) -> None:
    """Record ref as the version served for alias; written whole or not at all."""
    path = record_path(cache_dir, ref.name, alias)
    record = {"name": ref.name, **{key: getattr(ref, key) for key in _FIELDS}}
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".last-served-", dir=cache_dir)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            raise
    except OSError as e:
        # Serving goes on; only the next restart waits for the registry.
        log.warning("could not record the served version for restarts in %s: %s", cache_dir, e)


def recall(cache_dir: str, name: str, alias: str) -> VersionRef | None:
    """The version last served for name@alias, or None (nothing recorded, or a record that
    does not read as one: that is logged and ignored)."""
    from serving.model_store import VersionRef

    path = record_path(cache_dir, name, alias)
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or record.get("name") != name:
            raise ValueError("it names another model")
        version, created = record["version"], record["created_ms"]
        if not isinstance(version, str) or not version.isdigit() or type(created) is not int:
            raise ValueError("its version or creation time is not a number")
        run_id, model_id = record.get("run_id"), record.get("model_id")
        if not all(v is None or isinstance(v, str) for v in (run_id, model_id)):
            raise ValueError("its run or logged model is not a string")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring the record of the last served version %s: %s", path, e)
        return None
    return VersionRef(name=name, version=version, run_id=run_id, created_ms=created, model_id=model_id)
