"""`make demo`: run every workflow in workflows/ on a real headless ComfyUI with the pack.

Workflows whose model files are all present in ComfyUI's models folders run on them,
untouched. The others run in tiny mode: a second server with QKV_CONTROL_TINY_MODELS=1,
its own models folder holding the tiny model files, and the core loaders that cannot
read tiny models swapped for the pack's tiny loaders (images are then noise-like: the
run shows the pipeline, not image quality). Images go to output/demo/<workflow>/.

    python scripts/demo.py [--workflow PATH] [--output DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _runtime  # noqa: F401  (sys.path for the pack)
from _runtime import ROOT, comfyui_path, has_accelerator, import_comfy_for_tiny_models, pack_links

from client import prompt_api, ui_graph
from client import workflow_format as wf
from client.server import ComfyServer, make_base_directory

logger = logging.getLogger("qkv_control.demo")

MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".pt2", ".onnx")


@dataclass
class DemoRun:
    workflow: Path
    mode: str = ""
    seconds: float = 0.0
    images: list[Path] = field(default_factory=list)
    error: str = ""
    missing: list[str] = field(default_factory=list)


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def referenced_model_files(workflow: dict) -> list[str]:
    """Widget values that name a model file (``v1-5-pruned-emaonly.safetensors``, ``sub/x.pth``)."""
    values: list = []
    if wf.is_api_format(workflow):
        for node in workflow.values():
            values += list(node.get("inputs", {}).values())
    else:
        inner = [n for d in ui_graph.subgraph_definitions(workflow).values() for n in d.get("nodes", [])]
        for node in workflow.get("nodes", []) + inner:
            if node.get("mode", 0) in ui_graph.SKIPPED_MODES or node["type"] in ui_graph.NOTE_TYPES:
                continue
            widgets = node.get("widgets_values") or []
            values += list(widgets.values()) if isinstance(widgets, dict) else list(widgets)
    return sorted({v for v in values if isinstance(v, str) and v.lower().endswith(MODEL_EXTENSIONS)})


def available_model_files(models_dir: Path) -> set[str]:
    """Every file under ComfyUI's models/ by name and by path relative to its model folder."""
    found: set[str] = set()
    if not models_dir.is_dir():
        return found
    for path in models_dir.rglob("*"):
        if path.is_file():
            rel = path.relative_to(models_dir)
            found.add(path.name)
            if len(rel.parts) > 1:
                found.add(Path(*rel.parts[1:]).as_posix())
    return found


def copy_inputs(input_dir: Path) -> None:
    input_dir.mkdir(parents=True, exist_ok=True)
    source = ROOT / "workflows" / "inputs"
    if source.is_dir():
        for path in source.iterdir():
            if path.is_file():
                shutil.copy2(path, input_dir / path.name)


def start_server(mode: str, work: Path, out_root: Path, cpu: bool, threads: int | None) -> ComfyServer:
    """The tree's own models and custom nodes ("real"), or a tiny-model base directory ("tiny")."""
    comfy = comfyui_path()
    common = dict(comfyui=comfy, python=sys.executable, output_directory=work / "output",
                  temp_directory=work / "temp", user_directory=work / "user", cpu=cpu,
                  log_path=out_root / f"server-{mode}.log",
                  env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})
    if mode == "real":
        links = pack_links(comfy / "custom_nodes")
        if not links:
            raise RuntimeError(f"the pack is not linked into {comfy / 'custom_nodes'}: run `make setup`")
        if len(links) > 1:
            logger.warning("the pack is linked into custom_nodes more than once (%s): it loads twice",
                           ", ".join(p.name for p in links))
        copy_inputs(work / "input")
        server = ComfyServer(input_directory=work / "input", **common)
    else:
        models = make_base_directory(work / "base")
        copy_inputs(work / "base" / "input")
        import_comfy_for_tiny_models(cpu=cpu)
        from qkv_control.tiny.model_files import write_all

        write_all(models)
        server = ComfyServer(base_directory=work / "base", tiny_models=True, **common)
    started = time.monotonic()
    say(f"starting ComfyUI ({mode} models) ...")
    server.start(timeout=300)
    say(f"  ready at {server.url} in {time.monotonic() - started:.1f} s (log: {common['log_path']})")
    return server


def run_workflow(server: ComfyServer, run: DemoRun, object_info: dict, out_root: Path, timeout: float) -> None:
    workflow = json.loads(run.workflow.read_text())
    prompt = wf.ui_to_api(workflow, object_info)
    if run.mode == "tiny":
        prompt, replaced = wf.apply_tiny_substitutions(prompt, object_info)
        for line in replaced:
            say(f"  {run.workflow.stem}: tiny mode, node {line}")
    started = time.monotonic()
    entry = prompt_api.run_prompt(server.url, prompt, timeout=timeout)
    run.seconds = time.monotonic() - started
    target = out_root / run.workflow.stem
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in prompt_api.output_files(entry):
        if item["type"] != "output":
            continue
        path = target / item["filename"]
        path.write_bytes(prompt_api.download_file(server.url, item))
        run.images.append(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", type=Path, action="append",
                        help="run only this workflow file (repeatable); default: every workflows/*.json")
    parser.add_argument("--output", type=Path, default=Path("output") / "demo", help="where images go")
    parser.add_argument("--tiny", action="store_true", help="run every workflow in tiny mode")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per workflow")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the server (default: 1 on machines with 2 cores or fewer, "
                             "where more threads thrash, else torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    paths = args.workflow or sorted((ROOT / "workflows").glob("*.json"))
    if not paths:
        say("no workflows to run")
        return 1
    missing_files = [str(p) for p in paths if not p.is_file()]
    if missing_files:
        say(f"workflow not found: {', '.join(missing_files)}")
        return 2

    comfy = comfyui_path()
    available = available_model_files(comfy / "models")
    runs = []
    for path in paths:
        run = DemoRun(workflow=path)
        run.missing = [f for f in referenced_model_files(json.loads(path.read_text())) if f not in available]
        run.mode = "tiny" if (args.tiny or run.missing) else "real"
        runs.append(run)
        if run.missing and not args.tiny:
            say(f"{path.stem}: model files not found in {comfy / 'models'}: {', '.join(run.missing)}"
                " -> running on tiny random-weight models (noise-like images)")

    out_root = args.output.resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    cpu = not has_accelerator()
    threads = args.threads or (1 if cpu and (os.cpu_count() or 1) <= 2 else None)
    with tempfile.TemporaryDirectory(prefix="qkv-demo-") as tmp:
        for mode in ("real", "tiny"):
            group = [r for r in runs if r.mode == mode]
            if not group:
                continue
            try:
                server = start_server(mode, Path(tmp) / mode, out_root, cpu, threads)
            except Exception as exc:  # reported per workflow below
                for run in group:
                    run.error = f"server did not start: {exc}"
                continue
            try:
                object_info = wf.fetch_object_info(server.url)
                for run in group:
                    say(f"running {run.workflow.name} ({mode}) ...")
                    try:
                        run_workflow(server, run, object_info, out_root, args.timeout)
                    except (wf.WorkflowError, prompt_api.PromptError, TimeoutError, OSError) as exc:
                        run.error = str(exc)
            finally:
                server.stop()

    say("")
    width = max([len("workflow")] + [len(run.workflow.stem) for run in runs])
    say(f"{'workflow':<{width}} {'mode':<5} {'seconds':>8} {'images':>6}")
    for run in runs:
        say(f"{run.workflow.stem:<{width}} {run.mode:<5} {run.seconds:>8.1f} {len(run.images):>6}")
    say(f"images in {out_root}/<workflow>/")
    failed = [r for r in runs if r.error or not r.images]
    for run in failed:
        say(f"FAILED {run.workflow.name}: {run.error or 'no images written'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
