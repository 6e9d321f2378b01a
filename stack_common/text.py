"""Messages cut to a size a log line, a tag or an error answer can carry."""

from __future__ import annotations


def clip(text: str, limit: int) -> str:
    """text, or its start and end with the middle left out (and said so) when it is longer
    than limit: the end of a library's message is often the part that says why."""
    if len(text) <= limit:
        return text
    head = limit // 4
    return f"{text[:head]} ... [{len(text) - limit} characters left out] ... {text[head - limit:]}"


def one_line(message: object, limit: int = 500) -> str:
    """An error or text on one line (whitespace runs become one space), clipped to limit;
    an error without a message is named by its type."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    return clip(text, limit)
