"""The real ComfyUI server starts with the pack loaded, and the pack's nodes document themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.server

PACK_MODULE = "custom_nodes.qkv_control"


def pack_nodes(object_info: dict) -> dict[str, dict]:
    """Every node the pack registered (by the module ComfyUI loaded it from), whatever its id."""
    return {name: info for name, info in object_info.items()
            if str(info.get("python_module", "")).startswith(PACK_MODULE) or name.startswith("QKV")}


def test_server_loads_the_pack(comfy_server):
    stats = requests.get(f"{comfy_server.url}/system_stats", timeout=10).json()
    assert stats["system"]["comfyui_version"]
    nodes = pack_nodes(comfy_server.object_info())
    # The tiny loaders are registered because the test server runs with QKV_CONTROL_TINY_MODELS=1.
    assert {"QKVTinyCheckpointLoader", "QKVTinyCLIPVisionLoader"} <= set(nodes)
    log = comfy_server.log_text()
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-4000:]
    # The pack's web extension (WEB_DIRECTORY) is served once it has scripts.
    if list((Path(__file__).resolve().parents[1] / "web" / "js").glob("*.js")):
        extensions = requests.get(f"{comfy_server.url}/extensions", timeout=10).json()
        assert any("/qkv_control/" in ext for ext in extensions), extensions


def test_every_pack_node_has_a_description(comfy_server):
    nodes = pack_nodes(comfy_server.object_info())
    missing = sorted(name for name, info in nodes.items() if not str(info.get("description") or "").strip())
    assert not missing, f"pack nodes without a description: {missing}"


def test_every_pack_node_input_has_a_tooltip(comfy_server):
    missing = []
    for name, info in sorted(pack_nodes(comfy_server.object_info()).items()):
        for section in ("required", "optional"):
            for input_name, spec in (info.get("input", {}).get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not str(opts.get("tooltip") or "").strip():
                    missing.append(f"{name}.{input_name}")
    assert not missing, f"pack node inputs without a tooltip: {missing}"


def test_every_pack_node_output_has_a_tooltip(comfy_server):
    missing = []
    for name, info in sorted(pack_nodes(comfy_server.object_info()).items()):
        tooltips = info.get("output_tooltips") or []
        for index, output_name in enumerate(info.get("output_name") or []):
            if index >= len(tooltips) or not str(tooltips[index] or "").strip():
                missing.append(f"{name}.{output_name}")
    assert not missing, f"pack node outputs without a tooltip: {missing}"


def test_a_port_taken_after_it_was_picked_is_picked_again(tmp_path, monkeypatch):
    """Two suites side by side (``make test``'s passes) can pick the same free port: the server
    that loses the race starts again on another port, and talks only to itself."""
    import socket

    from qkv_control.client import server as server_module

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    picks = iter([port])
    real_free_port = server_module.free_port
    monkeypatch.setattr(server_module, "free_port", lambda host: next(picks, None) or real_free_port(host))
    server_module.make_base_directory(tmp_path / "base")
    server = server_module.ComfyServer(comfyui=server_module.comfyui_path(), python=sys.executable,
                                       base_directory=tmp_path / "base", output_directory=tmp_path / "output",
                                       temp_directory=tmp_path / "temp", user_directory=tmp_path / "user",
                                       log_path=tmp_path / "server.log", env={"OMP_NUM_THREADS": "1"})
    try:
        with server:
            assert server.port != port
            stats = requests.get(f"{server.url}/system_stats", timeout=10).json()
            assert str(server.port) in stats["system"]["argv"]
    finally:
        taken.close()
