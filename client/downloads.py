"""Where the batch CLI puts a downloaded output: under ``--out``, in the output's own subfolder.

A server reports each output as (subfolder, filename); two outputs with the same file name in
different subfolders are different files, so the subfolder is kept. What a server sends is
not trusted: ``..``, absolute paths and drive letters never lead out of ``--out``, and a file
already there (from another item, an earlier run, or the user) is never overwritten: the
new file gets the next free name instead.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

_UNSAFE_CHARACTERS = re.compile(r"[^\w.\- ]")


def safe_part(part: str) -> str:
    """One path component with separators, drive colons and control characters replaced."""
    cleaned = _UNSAFE_CHARACTERS.sub("_", part).strip(" ")
    return "_" if cleaned in ("", ".", "..") else cleaned


def relative_output_path(output: dict, prefix: str = "") -> PurePosixPath:
    """``subfolder/<prefix><filename>`` for a server output, relative and inside the folder.

    Empty, ``.`` and ``..`` components of the subfolder are dropped (``../x`` -> ``x``,
    ``/abs/p`` -> ``abs/p``); the filename keeps only its last component."""
    parts = [p for p in re.split(r"[\\/]+", str(output.get("subfolder") or "")) if p not in ("", ".", "..")]
    name = re.split(r"[\\/]+", str(output.get("filename") or ""))[-1]
    return PurePosixPath(*[safe_part(p) for p in parts], safe_part(prefix + name))


def save_output(out: Path, relative: PurePosixPath, data: bytes) -> PurePosixPath:
    """Write ``data`` to ``out/relative`` without overwriting anything; returns the path used.

    An existing file keeps its content: the new one becomes ``name_2.ext``, ``name_3.ext``, ..."""
    root = out.resolve()
    target = root.joinpath(*relative.parts)
    if not target.resolve().is_relative_to(root):  # a symlinked subfolder pointing elsewhere
        raise OSError(f"refusing to write {relative} outside {root}")
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix = target.stem, target.suffix
    for attempt in range(1, 10000):
        candidate = target if attempt == 1 else target.with_name(f"{stem}_{attempt}{suffix}")
        try:
            with open(candidate, "xb") as fh:  # exclusive: never replaces a file
                fh.write(data)
        except FileExistsError:
            continue
        return PurePosixPath(candidate.relative_to(root).as_posix())
    raise OSError(f"no free file name for {relative} in {root}")
