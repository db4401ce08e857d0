"""Batch queueing: run a workflow over a sweep of inputs on one or more ComfyUI servers.

Run from the pack's folder (the repo root, or ComfyUI/custom_nodes/qkv_control)::

    python -m client.queue WORKFLOW.json --out runs/sweep \\
        --set "KSampler.seed=1..3" \\
        --set 'Positive.text=["a red fox", "a lighthouse"]' \\
        --images "Load Image.image=refs/" \\
        --server http://127.0.0.1:8188 --server http://10.0.0.2:8188

``WORKFLOW`` is UI format (as saved by the frontend) or API format. ``--set NODE.INPUT=VALUES``
picks a node by id, title or class type (when unique); VALUES is ``A..B`` or ``A..B:STEP``
(integers, inclusive), a JSON list, ``@file.txt`` (one value per line) or a single value.
``--images NODE.INPUT=FOLDER`` sweeps over the images in a folder (uploaded through
``/upload/image``). Every combination of the sweeps is one item (``--zip`` pairs them
instead). Items are spread over the servers, progress follows the websocket, outputs are
downloaded through ``/view`` into ``--out``, and ``--out``/manifest.json maps each item's
parameters to its files. Running the same command again resumes: finished items are
skipped, items a server was still running are collected without queueing them again.
Exit status: 0 all items done, 1 some failed (summary printed), 2 bad arguments,
130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from . import workflow_format as wf

MANIFEST_NAME = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
UPLOAD_SUBFOLDER = "qkv_queue"


class UsageError(ValueError):
    """Bad command-line input; exit status 2."""


# --------------------------------------------------------------------------- sweeps

def parse_values(text: str) -> list:
    """``1..3`` -> [1, 2, 3]; ``0..10:5``; JSON list; ``@file`` lines; else one (JSON or string) value."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UsageError(f"--set: expected a file after '@', got {text!r} (not found)")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if ".." in text and not text.startswith(("[", '"')):
        span, _, step = text.partition(":")
        start, _, stop = span.partition("..")
        try:
            a, b, s = int(start), int(stop), int(step or 1)
        except ValueError:
            pass
        else:
            if s <= 0:
                raise UsageError(f"--set: range step must be positive, got {text!r}")
            return list(range(a, b + 1, s)) if a <= b else list(range(a, b - 1, -s))
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    if isinstance(value, list):
        if not value:
            raise UsageError(f"--set: expected at least one value, got {text!r}")
        return value
    return [value]


def image_folder(folder: str) -> list[str]:
    path = Path(folder)
    if not path.is_dir():
        raise UsageError(f"--images: expected a folder, got {folder!r}")
    images = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UsageError(f"--images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder!r}")
    return images


def split_assignment(text: str, option: str) -> tuple[str, str, str]:
    target, sep, values = text.partition("=")
    node, dot, input_name = target.rpartition(".")
    if not sep or not dot or not node or not input_name:
        raise UsageError(f"{option}: expected NODE.INPUT=VALUES, got {text!r}")
    return node.strip(), input_name.strip(), values


def find_node(prompt: dict, ref: str) -> str:
    """A node id by id, title (``_meta.title``) or class type; an error names the candidates."""
    if ref in prompt:
        return ref
    for key in (lambda n: n.get("_meta", {}).get("title"), lambda n: n["class_type"]):
        hits = [nid for nid, node in prompt.items() if key(node) == ref]
        if not hits:
            hits = [nid for nid, node in prompt.items() if str(key(node) or "").lower() == ref.lower()]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"node {ref!r} is ambiguous: ids {hits}; use the node id")
    names = sorted(f"{nid} ({n.get('_meta', {}).get('title', n['class_type'])})" for nid, n in prompt.items())
    raise UsageError(f"no node {ref!r} in the workflow; nodes: {', '.join(names)}")


@dataclass
class Sweep:
    """Parameter name ("Title.input") -> (node id, input name, values, is_image)."""

    axes: dict[str, tuple[str, str, list, bool]] = field(default_factory=dict)

    def items(self, zipped: bool = False) -> list[dict[str, Any]]:
        names = list(self.axes)
        columns = [self.axes[n][2] for n in names]
        if zipped:
            lengths = {len(c) for c in columns}
            if len(lengths) > 1:
                raise UsageError(f"--zip: every sweep needs the same length, got {dict(zip(names, map(len, columns)))}")
            rows = list(zip(*columns))
        else:
            rows = list(itertools.product(*columns))
        return [dict(zip(names, row)) for row in rows] or [{}]


def build_sweep(prompt: dict, sets: list[str], images: list[str], object_info: dict | None) -> Sweep:
    sweep = Sweep()
    for option, text in [("--set", s) for s in sets] + [("--images", s) for s in images]:
        ref, input_name, raw = split_assignment(text, option)
        node_id = find_node(prompt, ref)
        node = prompt[node_id]
        known = set(node["inputs"])
        if object_info and node["class_type"] in object_info:
            spec = object_info[node["class_type"]].get("input", {})
            known |= set(spec.get("required", {})) | set(spec.get("optional", {}))
        if input_name not in known:
            raise UsageError(f"{option}: node {ref!r} ({node['class_type']}) has no input {input_name!r}; "
                             f"inputs: {', '.join(sorted(known))}")
        if isinstance(node["inputs"].get(input_name), list):
            raise UsageError(f"{option}: {ref}.{input_name} is connected to another node; set that node instead")
        name = f"{ref}.{input_name}"
        if name in sweep.axes:
            raise UsageError(f"{option}: {name} is set twice")
        is_image = option == "--images"
        values = image_folder(raw) if is_image else parse_values(raw)
        sweep.axes[name] = (node_id, input_name, values, is_image)
    return sweep


def item_key(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- manifest

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


# --------------------------------------------------------------------------- progress

class Progress:
    """One status line on a terminal (``\\r``-redrawn), one line per event otherwise."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.done = self.failed = 0
        self.steps: dict[str, str] = {}

    def _bar(self) -> str:
        width = 24
        filled = int(width * (self.done + self.failed) / max(self.total, 1))
        steps = " ".join(f"[{k}: {v}]" for k, v in sorted(self.steps.items()))
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.failed} failed {steps}"

    def step(self, worker: str, text: str) -> None:
        with self.lock:
            self.steps[worker] = text
            if self.tty:
                self.stream.write("\r\033[K" + self._bar())
                self.stream.flush()

    def event(self, text: str, done: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.done += done
            self.failed += failed
            if self.tty:
                self.stream.write("\r\033[K" + text + "\n" + self._bar())
            else:
                self.stream.write(f"{text} ({self.done + self.failed}/{self.total})\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            with self.lock:
                self.stream.write("\n")
                self.stream.flush()


# --------------------------------------------------------------------------- running

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
                    entry = wf.history_entry(self.url, prompt_id)
                    if wf.entry_finished(entry):
                        return wf.check_entry(entry)
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
                    entry = wf.history_entry(self.url, prompt_id)
                    if wf.entry_finished(entry):
                        return wf.check_entry(entry)
                    time.sleep(0.25)

    # -- items
    def _prompt_for(self, item: dict) -> dict:
        prompt = copy.deepcopy(self.batch.base_prompt)
        for name, value in item["params"].items():
            node_id, input_name, _values, is_image = self.batch.sweep.axes[name]
            if is_image:
                if value not in self.uploads:
                    self.uploads[value] = wf.upload_image(self.url, value, subfolder=UPLOAD_SUBFOLDER)
                value = self.uploads[value]
            prompt[node_id]["inputs"][input_name] = value
        return prompt

    def _adoptable(self, item: dict) -> bool:
        """The server still knows this item's prompt (finished, running or queued)."""
        if item.get("status") not in ("queued", "done") or not item.get("prompt_id") or item.get("server") != self.url:
            return False
        try:
            if wf.history_entry(self.url, item["prompt_id"]) is not None:
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
            prompt_id = wf.queue_prompt(self.url, self._prompt_for(item), client_id=self.client_id)
            with manifest.lock:
                item.update(status="queued", server=self.url, prompt_id=prompt_id, error="")
                manifest.save()
        entry = self._wait(prompt_id, label)
        files = []
        for output in wf.output_files(entry):
            if output["type"] != "output":
                continue
            name = f"{item['index']:03d}_{output['filename']}"
            (self.batch.out / name).write_bytes(wf.download_file(self.url, output))
            files.append(name)
        if not files:
            raise wf.PromptError(f"{label}: the prompt finished but wrote no output files")
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
            except (wf.PromptError, wf.WorkflowError, TimeoutError, requests.RequestException, OSError) as exc:
                with self.batch.manifest.lock:
                    item.update(status="failed", error=str(exc), server=self.url)
                    self.batch.manifest.save()
                self.batch.progress.event(f"FAILED {label} on {self.url}: {str(exc).splitlines()[0]}", failed=1)
            else:
                self.batch.progress.event(f"done {label} -> {', '.join(item['files'])}", done=1)
            self.batch.progress.step(self.name, "idle")
        if self.ws is not None:
            self.ws.close()


def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read workflow {path}: {exc}") from exc
    if isinstance(data, dict) and "prompt" in data and wf.is_api_format(data["prompt"]):
        data = data["prompt"]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.queue", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("workflow", type=Path, help="UI- or API-format workflow JSON")
    parser.add_argument("--out", type=Path, required=True, help="folder for outputs and manifest.json")
    parser.add_argument("--server", action="append", help="ComfyUI URL (repeatable; default http://127.0.0.1:8188)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUES")
    parser.add_argument("--images", action="append", default=[], metavar="NODE.INPUT=FOLDER")
    parser.add_argument("--zip", action="store_true", help="pair the sweeps element-wise instead of all combinations")
    parser.add_argument("--tiny", action="store_true",
                        help="swap core loaders for the pack's tiny test loaders (server with QKV_CONTROL_TINY_MODELS=1)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per item")
    parser.add_argument("--dry-run", action="store_true", help="list the items and exit")
    args = parser.parse_args(argv)
    servers = [s.rstrip("/") for s in (args.server or ["http://127.0.0.1:8188"])]

    try:
        workflow = load_workflow(args.workflow)
        try:
            object_info = wf.fetch_object_info(servers[0])
        except requests.RequestException as exc:
            raise UsageError(f"cannot reach ComfyUI at {servers[0]}: {exc}") from exc
        prompt = wf.ui_to_api(workflow, object_info)
        if args.tiny:
            prompt, _ = wf.apply_tiny_substitutions(prompt, object_info)
        sweep = build_sweep(prompt, args.sets, args.images, object_info)
        all_params = sweep.items(zipped=args.zip)
        args.out.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()
        manifest = Manifest(args.out / MANIFEST_NAME, args.workflow, sha)
    except (UsageError, wf.WorkflowError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2

    if args.dry_run:
        for index, params in enumerate(all_params):
            sys.stdout.write(f"{index:3d} {json.dumps(params, default=str)}\n")
        return 0

    items = manifest.merge(all_params)
    finished = [i for i in items if i["status"] == "done" and all((args.out / f).is_file() for f in i["files"])]
    todo = [i for i in items if i not in finished]
    progress = Progress(len(items))
    progress.done = len(finished)
    sys.stderr.write(f"{len(items)} items, {len(finished)} already done, {len(todo)} to run on "
                     f"{len(servers)} server(s); manifest {manifest.path}\n")
    batch = Batch(base_prompt=prompt, sweep=sweep, manifest=manifest, out=args.out, progress=progress,
                  timeout=args.timeout, pending=list(todo), servers=tuple(servers))
    workers = [ServerWorker(url, f"s{n}", batch) for n, url in enumerate(servers)]
    try:
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.2)
    except KeyboardInterrupt:
        batch.stop.set()
        manifest.save()
        progress.close()
        sys.stderr.write(f"interrupted: manifest saved to {manifest.path}; run the same command again to resume "
                         "(prompts already queued keep running on the server and are collected then)\n")
        return 130
    progress.close()

    done = [i for i in items if i["status"] == "done"]
    failed = [i for i in items if i["status"] != "done"]
    outputs = sum(len(i["files"]) for i in done)
    sys.stdout.write(f"{len(done)}/{len(items)} items done ({len(finished)} from an earlier run), "
                     f"{outputs} output files in {args.out}, manifest {manifest.path}\n")
    if failed:
        sys.stdout.write(f"{len(failed)} item(s) failed:\n")
        for item in failed:
            error = item.get("error") or item["status"]
            sys.stdout.write(f"  item {item['index']} {json.dumps(item['params'], default=str)}: {error}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
