"""URIs as they may be shown: in logs, run tags, /status and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact(uri: str) -> str:
    """The URI without the user:password@ it may carry."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
