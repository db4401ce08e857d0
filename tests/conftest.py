"""Test bootstrap: the real ComfyUI tree provisioned by scripts/setup.sh, on CPU with SDPA.

ComfyUI's startup flags must be set before anything imports
``comfy.model_management``, so this runs before any test module is collected.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(os.environ.get("QKV_RUNTIME", ROOT / ".runtime"))


def _comfyui_path() -> Path:
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    marker = RUNTIME / "comfyui_path"
    if not marker.exists():
        raise RuntimeError("ComfyUI runtime missing: run `make test` (it runs scripts/setup.sh first)")
    return Path(marker.read_text().strip())


COMFYUI_PATH = _comfyui_path()
sys.path.insert(0, str(COMFYUI_PATH))
sys.path.insert(0, str(RUNTIME / "import"))

import torch  # noqa: E402

torch.set_num_threads(1)

from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.use_pytorch_cross_attention = True
args.disable_smart_memory = True



@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return COMFYUI_PATH


def _load_test_server_module():
    # Loaded by path: ComfyUI's own top-level ``server`` module is on sys.path too.
    import importlib.util

    spec = importlib.util.spec_from_file_location("qkv_tests_server", Path(__file__).with_name("server.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """The real ComfyUI ``main.py`` with the pack and tiny loaders (tests/server.py ``TestServer``).

    ``.url``, ``.object_info()``, ``.api_prompt(workflow)``, ``.run(workflow)``,
    ``.output_paths(entry)``, ``.models_directory``, ``.input_directory``. Started once per
    session, stopped by PID at the end (also when a test fails).
    """
    module = _load_test_server_module()
    server = module.start_test_server(tmp_path_factory.mktemp("comfy_server"))
    try:
        yield server
    finally:
        server.server.stop()
