"""Batch queueing: run a workflow over a sweep of inputs on one or more ComfyUI servers.

Run from the pack's folder (the repo root, or ComfyUI/custom_nodes/qkv_control)::

    python -m client.queue WORKFLOW.json --out runs/sweep \\
        --set "KSampler.seed=1..3" \\
        --set 'Positive.text=["a red fox", "a lighthouse"]' \\
        --images "Load Image.image=refs/" \\
        --server http://127.0.0.1:8188 --server http://10.0.0.2:8188

``WORKFLOW`` is UI format (as saved by the frontend, subgraphs included) or API format.
``--set NODE.INPUT=VALUES`` picks a node by id, title or class type (when unique); a subgraph
node's widget by the subgraph node's id or title (``"QKV Image Prompt (InDetail-IP).steps"``: every
inner input the widget feeds), a node inside a subgraph by its id ``SUBGRAPH_NODE:INNER_NODE`` or
its title. VALUES is ``A..B`` or ``A..B:STEP`` (integers, inclusive), a JSON list, ``@file.txt``
(one value per line) or a single value.
``--images NODE.INPUT=FOLDER`` sweeps over the images in a folder (uploaded through
``/upload/image``). Every combination of the sweeps is one item (``--zip`` pairs them
instead). Items are spread over the servers, progress follows the websocket, outputs are
downloaded through ``/view`` into ``--out`` (in their own subfolder, never over an existing
file), and ``--out``/manifest.json maps each item's parameters to its files. Running the same
command again resumes: finished items are skipped, items a server was still running are
collected without queueing them again.
Exit status: 0 all items done, 1 some failed (summary printed), 2 bad arguments,
130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import requests

from . import workflow_format as wf
from .manifest import MANIFEST_NAME, Manifest
from .progress import Progress
from .sweep import UsageError, build_sweep
from .worker import Batch, ServerWorker


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
        expansion = wf.expand_workflow(workflow, object_info)
        prompt = expansion.prompt
        if args.tiny:
            prompt, _ = wf.apply_tiny_substitutions(prompt, object_info)
        sweep = build_sweep(prompt, args.sets, args.images, object_info, promoted=expansion.promoted)
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
