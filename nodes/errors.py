"""Errors a node raises name the node: ``ValueError("<display name>: expected ..., got ...")``."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def errors_named(node: str):
    """ValueErrors raised inside (the controls' and specs' own checks), prefixed with the node's
    display name (once)."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        raise ValueError(message if message.startswith(node) else f"{node}: {message}") from None
