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
sys.path.insert(0, str(RUNTIME / "import"))

# The tree under test: $QKV_COMFYUI=oldest (the suite's second pass in `make test`), else
# $COMFYUI_PATH, else the provisioned one; the server fixture starts main.py from the same tree.
from qkv_control.client.server import comfyui_path as chosen_comfyui_path  # noqa: E402

COMFYUI_PATH = chosen_comfyui_path()
sys.path.insert(0, str(COMFYUI_PATH))

import torch  # noqa: E402

torch.set_num_threads(1)

# The reference K/V bank is process-wide and on by default: off for the in-process tests, whose row
# counts and equalities are those of the cold path (a second test with the same reference would be
# warm); tests/test_kv_bank*.py turn it on. The test server runs with the product default (tests/server.py).
os.environ["QKV_KV_BANK_MB"] = "0"

from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.use_pytorch_cross_attention = True
args.disable_smart_memory = True


def comfyui_version(path: Path = COMFYUI_PATH) -> str:
    namespace: dict = {}
    exec((path / "comfyui_version.py").read_text(), namespace)
    return namespace["__version__"]


def pytest_report_header(config):
    return f"ComfyUI {comfyui_version()} at {COMFYUI_PATH}"


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
