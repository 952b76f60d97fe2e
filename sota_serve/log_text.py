"""Client-supplied text in a log line: one line, cut to a length.

Error messages and request paths can quote what a client sent (a line break in a
percent-encoded path, a megabyte of JSON in a field): logged as they are, they would forge
log lines or flood the log. Every front end logs a client's mistake through :func:`one_line`.
"""

from __future__ import annotations

#: a logged message is cut here
MAX_LOGGED = 300


def one_line(text: str, limit: int = MAX_LOGGED) -> str:
    """``text`` with every run of whitespace (line breaks included) as one space, cut to ``limit``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
