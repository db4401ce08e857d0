"""How a node names itself in its errors: one mechanism for every node of the pack.

A node's errors start with its display name (``"<display name>: expected ..., got ..."``), the
name the user sees on the canvas. A node wraps its ``execute`` body in ``errors_named(NAME)``
with ``NAME`` the same constant its schema's ``display_name`` uses; errors raised below (the
method packages' checks, which do not know which node called them) get the prefix once."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def errors_named(node: str):
    try:
        yield
    except ValueError as error:
        message = str(error)
        if message.startswith(node):
            raise
        raise ValueError(f"{node}: {message}") from error
