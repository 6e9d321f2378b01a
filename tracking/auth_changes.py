"""How many changes to users, roles and grants this tracking server's workers have made.

The workers remember users and grants (auth_lookups.py); each change appends one byte to a
file in the container's private /tmp, so its size is the count every worker reads with one
stat before it trusts what it remembers. A change made by another replica (Kubernetes runs
two) or straight in the database is not counted here: the caches' expiry bounds those.
"""

from __future__ import annotations

import os
import tempfile


def path() -> str:
    return os.environ.get("MLFLOW_AUTH_CHANGES_FILE") or os.path.join(tempfile.gettempdir(), "mlflow-auth-changes")


def count() -> int:
    try:
        return os.stat(path()).st_size
    except FileNotFoundError:
        return 0


def mark() -> None:
    """Count one change; O_APPEND makes concurrent marks from several workers each count."""
    fd = os.open(path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
