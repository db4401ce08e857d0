"""Running API-format prompts on a ComfyUI server over HTTP: queue, wait, fetch outputs, upload.

Pure Python + ``requests``: the tests, ``make demo`` and the batch CLI share this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests


class PromptError(RuntimeError):
    """The server rejected or failed a prompt. ``details`` holds the server's JSON."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


def format_prompt_error(body: Any) -> str:
    """A readable message from ``POST /prompt``'s error JSON, node_errors included."""
    if not isinstance(body, dict):
        return str(body)
    lines = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        lines.append(str(err))
    for node_id, node_err in (body.get("node_errors") or {}).items():
        for e in node_err.get("errors", []):
            lines.append(f"node {node_id} ({node_err.get('class_type', '?')}): {e.get('message', '')}: "
                         f"{e.get('details', '')}".rstrip(": "))
    return "\n".join(lines) or str(body)


def queue_prompt(url: str, prompt: dict, client_id: str | None = None, timeout: float = 60) -> str:
    """POST /prompt; returns the prompt id or raises PromptError with the node errors."""
    payload: dict[str, Any] = {"prompt": prompt}
    if client_id:
        payload["client_id"] = client_id
    r = requests.post(f"{url}/prompt", json=payload, timeout=timeout)
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if r.status_code != 200 or not isinstance(body, dict) or "prompt_id" not in body:
        raise PromptError(f"server rejected the prompt (HTTP {r.status_code}):\n{format_prompt_error(body)}", body)
    if body.get("node_errors"):
        raise PromptError(f"server reported node errors:\n{format_prompt_error(body)}", body)
    return body["prompt_id"]


def history_entry(url: str, prompt_id: str, timeout: float = 30) -> dict | None:
    r = requests.get(f"{url}/history/{prompt_id}", timeout=timeout)
    r.raise_for_status()
    return r.json().get(prompt_id)


def execution_error_message(entry: dict) -> str:
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            where = f"node {data.get('node_id')} ({data.get('node_type')})" if data.get("node_id") else "prompt"
            return f"{kind} in {where}: {data.get('exception_type', '')} {data.get('exception_message', '')}".strip()
    return f"prompt failed: {entry.get('status')}"


def entry_finished(entry: dict | None) -> bool:
    status = (entry or {}).get("status") or {}
    return bool(status.get("completed")) or status.get("status_str") in ("success", "error")


def check_entry(entry: dict) -> dict:
    """Raise PromptError when a history entry records a failed run."""
    status = entry.get("status") or {}
    if status.get("status_str") == "error" or not status.get("completed", True):
        raise PromptError(execution_error_message(entry), entry)
    return entry


def wait_for_prompt(url: str, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
    """Poll /history until the prompt finished; returns its entry or raises PromptError/TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        entry = history_entry(url, prompt_id)
        if entry_finished(entry):
            return check_entry(entry)
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s on {url}")
        time.sleep(poll)


def run_prompt(url: str, prompt: dict, timeout: float = 600) -> dict:
    """Queue an API-format prompt and wait for it; returns the history entry."""
    return wait_for_prompt(url, queue_prompt(url, prompt), timeout=timeout)


def output_files(entry: dict, kinds: tuple[str, ...] = ("images", "gifs", "videos", "audio")) -> list[dict]:
    """``[{"node_id", "filename", "subfolder", "type"}, ...]`` of a history entry, in node order."""
    files = []
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for kind in kinds:
            for item in outputs.get(kind) or []:
                if isinstance(item, dict) and "filename" in item:
                    files.append({"node_id": node_id, "filename": item["filename"],
                                  "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")})
    return files


def download_file(url: str, item: dict, timeout: float = 60) -> bytes:
    """GET /view for one output file."""
    params = {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
    r = requests.get(f"{url}/view", params=params, timeout=timeout)
    r.raise_for_status()
    return r.content


def upload_image(url: str, path, subfolder: str = "", overwrite: bool = True, timeout: float = 60) -> str:
    """POST /upload/image into the input folder; returns the name for a LoadImage ``image`` input."""
    path = Path(path)
    with open(path, "rb") as fh:
        r = requests.post(f"{url}/upload/image", files={"image": (path.name, fh)},
                          data={"overwrite": "true" if overwrite else "false", "type": "input",
                                "subfolder": subfolder}, timeout=timeout)
    r.raise_for_status()
    body = r.json()
    return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]
