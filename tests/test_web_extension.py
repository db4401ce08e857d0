"""The pack's web folder as the server serves it: scripts and one help page per node.

The frontend (comfyui-frontend-package, NodeHelpService) fetches a custom node's help from
``/extensions/<pack folder>/docs/<NodeId>.md``, and ComfyUI serves ``/extensions/<pack folder>/``
from the pack's ``WEB_DIRECTORY`` (``./web``): so ``web/docs/<NodeId>.md`` is the help page and
``web/js/*.js`` the scripts. Nodes are discovered from ``/object_info``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
PACK = "qkv_control"  # the folder the test server links the pack as


def pack_nodes(object_info: dict) -> list[str]:
    return sorted(name for name, info in object_info.items()
                  if str(info.get("python_module", "")).split(".")[:2] == ["custom_nodes", PACK])


def test_the_extension_scripts_are_served(comfy_server):
    scripts = sorted(p.relative_to(ROOT / "web").as_posix() for p in (ROOT / "web").rglob("*.js"))
    assert scripts, "web/ holds no script"
    listed = requests.get(f"{comfy_server.url}/extensions", timeout=10).json()
    for script in scripts:
        url = f"/extensions/{PACK}/{script}"
        assert url in listed, f"{url} not in /extensions"
        response = requests.get(comfy_server.url + url, timeout=10)
        assert response.status_code == 200 and "registerExtension" in response.text, url


def test_every_pack_node_has_a_help_page(comfy_server):
    nodes = pack_nodes(comfy_server.object_info())
    assert nodes
    missing = [name for name in nodes if not (DOCS / f"{name}.md").is_file()]
    assert not missing, f"pack nodes without web/docs/<NodeId>.md: {missing}"
    untitled = [name for name in nodes if not (DOCS / f"{name}.md").read_text().lstrip().startswith("# ")]
    assert not untitled, f"help pages that do not start with a '# Title' line: {untitled}"


def test_help_pages_are_served_where_the_frontend_looks(comfy_server):
    served_wrong = []
    for name in pack_nodes(comfy_server.object_info()):
        page = DOCS / f"{name}.md"
        if not page.is_file():
            continue  # reported by test_every_pack_node_has_a_help_page
        response = requests.get(f"{comfy_server.url}/extensions/{PACK}/docs/{name}.md", timeout=10)
        if response.status_code != 200 or response.content != page.read_bytes():
            served_wrong.append(f"{name}: HTTP {response.status_code}")
    assert not served_wrong, f"help pages not served at /extensions/{PACK}/docs/<NodeId>.md: {served_wrong}"


def test_no_help_page_for_a_node_that_does_not_exist(comfy_server):
    # A renamed node leaves its old page behind; node ids are never renamed, so this is a typo.
    nodes = set(pack_nodes(comfy_server.object_info()))
    orphans = sorted(p.stem for p in DOCS.glob("*.md") if p.stem not in nodes)
    assert not orphans, f"web/docs pages with no node of that id: {orphans}"
