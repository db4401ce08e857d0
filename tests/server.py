"""The real ComfyUI server the ``server``-marked tests talk to.

``main.py`` from the provisioned ComfyUI tree runs on loopback at a free port with its own
base directory (``models/`` with the tiny model files of ``tiny.model_files.WRITERS`` and a
placeholder under every file name the workflows' and blueprints' core loaders use, so the
frontend shows them as present; ``input/`` with ``workflows/inputs/*``,
``custom_nodes/qkv_control`` linked to the pack),
output, temp and user directories, and ``QKV_CONTROL_TINY_MODELS=1`` so the tiny loader
nodes are registered. Started once per session by the ``comfy_server`` fixture
(tests/conftest.py) and stopped by its PID.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qkv_control.client import prompt_api
from qkv_control.client import workflow_format as wf
from qkv_control.client.server import ComfyServer, comfyui_path, make_base_directory

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
WORKFLOW_INPUTS = WORKFLOWS / "inputs"
SUBGRAPHS = ROOT / "subgraphs"
PLACEHOLDER_TEXT = ("placeholder written by tests/server.py: the test server lists this file name, "
                    "tiny mode replaces the loader that would read it\n")


@dataclass
class TestServer:
    """A started server plus the helpers tests need."""

    __test__ = False  # not a test class for pytest

    server: ComfyServer
    root: Path
    startup_seconds: float = 0.0
    _object_info: dict | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def models_directory(self) -> Path:
        return self.root / "base" / "models"

    @property
    def input_directory(self) -> Path:
        return self.root / "base" / "input"

    @property
    def output_directory(self) -> Path:
        return self.root / "output"

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = wf.fetch_object_info(self.url)
        return self._object_info

    def log_text(self) -> str:
        return self.server.log_text()

    def api_prompt(self, workflow: dict | Path, tiny: bool = True) -> dict:
        """A UI- or API-format workflow (dict or file) as an API prompt, tiny loaders substituted."""
        if not isinstance(workflow, dict):
            workflow = json.loads(Path(workflow).read_text())
        prompt = wf.ui_to_api(workflow, self.object_info())
        if tiny:
            prompt, _ = wf.apply_tiny_substitutions(prompt, self.object_info())
        return prompt

    def run(self, workflow: dict | Path, tiny: bool = True, timeout: float = 600) -> dict:
        """Run a workflow to completion; returns the /history entry (raises PromptError on failure)."""
        return prompt_api.run_prompt(self.url, self.api_prompt(workflow, tiny=tiny), timeout=timeout)

    def output_paths(self, entry: dict) -> list[Path]:
        """Files a finished prompt wrote into the output directory."""
        return [self.output_directory / f["subfolder"] / f["filename"]
                for f in prompt_api.output_files(entry) if f["type"] == "output"]


def write_placeholder_models(models: Path, object_info: dict) -> list[Path]:
    """A placeholder file for every model file a workflow or blueprint names in a core loader
    that tiny mode replaces (a real model file name the test server has no file for)."""
    written = []
    for path in sorted(WORKFLOWS.glob("*.json")) + sorted(SUBGRAPHS.glob("*.json")):
        prompt = wf.ui_to_api(json.loads(path.read_text()), object_info)
        for folder, names in wf.substituted_model_files(prompt).items():
            for name in sorted(names):
                target = models / folder / name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(PLACEHOLDER_TEXT)
                    written.append(target)
    return written


def start_test_server(root: Path, timeout: float = 240.0) -> TestServer:
    """Lay out ``root`` and start the server; stops it again if start-up fails."""
    from qkv_control.tiny.model_files import write_all

    root.mkdir(parents=True, exist_ok=True)
    inputs = sorted(WORKFLOW_INPUTS.glob("*")) if WORKFLOW_INPUTS.is_dir() else []
    models = make_base_directory(root / "base", inputs=inputs)
    write_all(models)
    server = ComfyServer(
        comfyui=comfyui_path(),
        python=sys.executable,
        base_directory=root / "base",
        output_directory=root / "output",
        temp_directory=root / "temp",
        user_directory=root / "user",
        tiny_models=True,
        log_path=root / "server.log",
        # 2-core machines: one torch thread (see ENVIRONMENT.md).
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QKV_KV_BANK_MB": "auto"},
    )
    started = time.monotonic()
    server.start(timeout=timeout)
    try:
        # ComfyUI re-lists a model folder when its modification time changes: no restart needed.
        write_placeholder_models(models, wf.fetch_object_info(server.url))
    except BaseException:
        server.stop()
        raise
    return TestServer(server=server, root=root, startup_seconds=time.monotonic() - started)
