"""The batch CLI's record of a run: ``--out``/manifest.json, so that running the same command resumes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from .sweep import UsageError, item_key

MANIFEST_NAME = "manifest.json"


class Manifest:
    """``out/manifest.json``: every item's parameters, status, prompt id and files. Saved atomically."""

    def __init__(self, path: Path, workflow: Path, workflow_sha: str):
        self.path = path
        self.lock = threading.RLock()
        self.data: dict[str, Any] = {"workflow": str(workflow), "workflow_sha256": workflow_sha, "items": []}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("workflow_sha256") != workflow_sha:
                raise UsageError(f"{path} belongs to another workflow (or the workflow changed); "
                                 "use another --out folder to start a new batch")
            self.data = old

    def merge(self, all_params: list[dict]) -> list[dict]:
        """Items of this run, in order; entries of an earlier run with the same parameters are reused."""
        with self.lock:
            by_key = {item["key"]: item for item in self.data["items"]}
            items = []
            for index, params in enumerate(all_params):
                key = item_key(params)
                item = by_key.pop(key, None) or {"key": key, "params": params, "status": "pending", "files": []}
                item["index"] = index
                items.append(item)
            # Items of an earlier run that this command no longer asks for stay recorded, last.
            self.data["items"] = items + list(by_key.values())
            self.save()
            return items

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=2, default=str))
            os.replace(tmp, self.path)
