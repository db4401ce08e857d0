"""Running a batch: one worker thread per server queues items, follows the websocket, downloads outputs."""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from . import prompt_api
from .downloads import relative_output_path, save_output
from .manifest import Manifest
from .progress import Progress
from .sweep import Sweep
from .workflow_format import WorkflowError

# Uploaded sweep images go to input/<this>/<content hash>/<name>: same-named images from two
# folders never replace each other, and an image uploaded again lands on the same name.
UPLOAD_SUBFOLDER = "qkv_queue"


def upload_subfolder(path: str | Path) -> str:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"{UPLOAD_SUBFOLDER}/{digest}"


@dataclass
class Batch:
    base_prompt: dict
    sweep: Sweep
    manifest: Manifest
    out: Path
    progress: Progress
    timeout: float
    pending: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    servers: tuple[str, ...] = ()

    def next_item(self, server: str) -> dict | None:
        """The next item for ``server``: first those it was still running when an earlier run
        stopped (collected, not queued again), never those another listed server is running."""
        with self.lock:
            if self.stop.is_set():
                return None

            def running_on(item: dict) -> str | None:
                return item.get("server") if item.get("status") == "queued" and item.get("prompt_id") else None

            for pick in (lambda i: running_on(i) == server, lambda i: running_on(i) not in self.servers):
                for index, item in enumerate(self.pending):
                    if pick(item):
                        return self.pending.pop(index)
            return None


class ServerWorker(threading.Thread):
    """Runs items one at a time on one server, following its websocket."""

    def __init__(self, url: str, name: str, batch: Batch):
        super().__init__(daemon=True, name=name)
        self.url = url.rstrip("/")
        self.batch = batch
        self.client_id = uuid.uuid4().hex
        self.uploads: dict[str, str] = {}
        self.ws = None

    # -- websocket
    def _connect(self) -> None:
        try:
            import websocket
        except ImportError:
            self.ws = None
            return
        parsed = urlparse(self.url)
        scheme = "wss" if parsed.scheme == "https" else "ws"
        try:
            self.ws = websocket.create_connection(f"{scheme}://{parsed.netloc}/ws?clientId={self.client_id}",
                                                  timeout=10)
            self.ws.settimeout(1.0)
        except (OSError, websocket.WebSocketException):
            self.ws = None  # fall back to polling /history

    def _messages(self):
        """Websocket JSON messages; yields None every second without one."""
        import websocket

        while True:
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                yield None
                continue
            except (OSError, websocket.WebSocketException):
                self.ws = None
                return
            if isinstance(raw, str):
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue

    def _wait(self, prompt_id: str, label: str) -> dict:
        deadline = time.monotonic() + self.batch.timeout
        last_poll = 0.0
        messages = self._messages() if self.ws is not None else None
        while True:
            if messages is not None and self.ws is None:
                messages = None  # the websocket dropped: poll /history from here on
            message = next(messages, None) if messages is not None else None
            if message is None:
                if messages is None:
                    time.sleep(0.5)
                if time.monotonic() - last_poll > (5.0 if messages is not None else 0.5):
                    last_poll = time.monotonic()
                    entry = prompt_api.history_entry(self.url, prompt_id)
                    if prompt_api.entry_finished(entry):
                        return prompt_api.check_entry(entry)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{label}: not finished after {self.batch.timeout:.0f} s")
                continue
            data = message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            kind = message.get("type")
            if kind == "progress":
                self.batch.progress.step(self.name, f"{label} step {data.get('value')}/{data.get('max')}")
            elif kind == "executing" and data.get("node") is not None:
                self.batch.progress.step(self.name, f"{label} node {data.get('node')}")
            elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                    kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
                # /history is written right after; poll it briefly.
                for _ in range(40):
                    entry = prompt_api.history_entry(self.url, prompt_id)
                    if prompt_api.entry_finished(entry):
                        return prompt_api.check_entry(entry)
                    time.sleep(0.25)

    # -- items
    def _prompt_for(self, item: dict) -> dict:
        prompt = copy.deepcopy(self.batch.base_prompt)
        for name, value in item["params"].items():
            axis = self.batch.sweep.axes[name]
            if axis.is_image:
                if value not in self.uploads:
                    self.uploads[value] = prompt_api.upload_image(self.url, value, subfolder=upload_subfolder(value))
                value = self.uploads[value]
            for node_id, input_name in axis.targets:
                prompt[node_id]["inputs"][input_name] = value
        return prompt

    def _adoptable(self, item: dict) -> bool:
        """The server still knows this item's prompt (finished, running or queued)."""
        if item.get("status") not in ("queued", "done") or not item.get("prompt_id") or item.get("server") != self.url:
            return False
        try:
            if prompt_api.history_entry(self.url, item["prompt_id"]) is not None:
                return True
            queue = requests.get(f"{self.url}/queue", timeout=30).json()
        except (requests.RequestException, ValueError):
            return False
        queued = queue.get("queue_running", []) + queue.get("queue_pending", [])
        return any(len(entry) > 1 and entry[1] == item["prompt_id"] for entry in queued)

    def _run_item(self, item: dict) -> None:
        label = f"item {item['index']}"
        manifest = self.batch.manifest
        started = time.monotonic()
        if self._adoptable(item):
            prompt_id = item["prompt_id"]
        else:
            prompt_id = prompt_api.queue_prompt(self.url, self._prompt_for(item), client_id=self.client_id)
            with manifest.lock:
                item.update(status="queued", server=self.url, prompt_id=prompt_id, error="")
                manifest.save()
        entry = self._wait(prompt_id, label)
        files = []
        for output in prompt_api.output_files(entry):
            if output["type"] != "output":
                continue
            relative = relative_output_path(output, prefix=f"{item['index']:03d}_")
            saved = save_output(self.batch.out, relative, prompt_api.download_file(self.url, output))
            files.append(saved.as_posix())
        if not files:
            raise prompt_api.PromptError(f"{label}: the prompt finished but wrote no output files")
        with manifest.lock:
            item.update(status="done", files=files, seconds=round(time.monotonic() - started, 2), error="")
            manifest.save()

    def run(self) -> None:
        self._connect()
        while True:
            item = self.batch.next_item(self.url)
            if item is None:
                break
            label = f"item {item['index']} {json.dumps(item['params'], default=str)}"
            try:
                self._run_item(item)
            except (prompt_api.PromptError, WorkflowError, TimeoutError, requests.RequestException, OSError) as exc:
                with self.batch.manifest.lock:
                    item.update(status="failed", error=str(exc), server=self.url)
                    self.batch.manifest.save()
                self.batch.progress.event(f"FAILED {label} on {self.url}: {str(exc).splitlines()[0]}", failed=1)
            else:
                self.batch.progress.event(f"done {label} -> {', '.join(item['files'])}", done=1)
            self.batch.progress.step(self.name, "idle")
        if self.ws is not None:
            self.ws.close()
