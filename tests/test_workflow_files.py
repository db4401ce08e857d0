"""The shared workflow files: every UI-format workflow has an up-to-date API-format copy and a note.

``workflows/<name>.json`` is what the frontend opens (template browser, drag and drop);
``workflows/api/<name>.json`` is what ``POST /prompt`` and the batch CLI take. The copies are
written by ``make workflows-api`` (scripts/workflows_api.py); this test converts each UI
workflow again against the test server's ``/object_info`` and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_DIR = ROOT / "workflows" / "api"
REGENERATE = "run `make workflows-api` and commit workflows/api/"
NOTE_TYPES = ("MarkdownNote", "Note")
MIN_NOTE_CHARS = 80  # a title alone does not say what to change


def render(prompt: dict) -> str:
    # The exact text scripts/workflows_api.py writes, so regenerating leaves no diff.
    return json.dumps(prompt, indent=2, ensure_ascii=False) + "\n"


def test_every_workflow_has_an_api_copy_and_no_copy_is_orphaned():
    ui_names = {p.name for p in WORKFLOWS}
    api_names = {p.name for p in API_DIR.glob("*.json")}
    assert not ui_names - api_names, f"workflows without an API copy: {sorted(ui_names - api_names)}; {REGENERATE}"
    assert not api_names - ui_names, f"API copies of removed workflows: {sorted(api_names - ui_names)}; {REGENERATE}"


@pytest.mark.server
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_api_copy_matches_the_ui_workflow(comfy_server, path):
    from qkv_control.client.workflow_format import is_api_format, ui_to_api

    copy_path = API_DIR / path.name
    if not copy_path.is_file():
        pytest.fail(f"{copy_path.relative_to(ROOT)} missing; {REGENERATE}")
    copy = json.loads(copy_path.read_text())
    assert is_api_format(copy), f"{copy_path.name} is not an API-format prompt"
    expected = ui_to_api(json.loads(path.read_text()), comfy_server.object_info())
    if copy != expected:
        changed = sorted(node_id for node_id in set(copy) | set(expected) if copy.get(node_id) != expected.get(node_id))
        details = {node_id: {"file": copy.get(node_id), "expected": expected.get(node_id)} for node_id in changed[:3]}
        pytest.fail(f"{copy_path.relative_to(ROOT)} is out of date (nodes {changed}); {REGENERATE}\n"
                    f"{json.dumps(details, indent=1)[:3000]}")
    assert copy_path.read_text() == render(expected), f"{copy_path.name}: same content, other formatting; {REGENERATE}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_carries_a_markdown_note(path):
    workflow = json.loads(path.read_text())
    notes = [node for node in workflow.get("nodes", []) if node.get("type") in NOTE_TYPES]
    assert any(node["type"] == "MarkdownNote" for node in notes), f"{path.name} has no MarkdownNote"
    texts = [str((node.get("widgets_values") or [""])[0]) for node in notes if node["type"] == "MarkdownNote"]
    assert max(len(t.strip()) for t in texts) >= MIN_NOTE_CHARS, (
        f"{path.name}: its MarkdownNote is too short to say what to change: {texts}")
