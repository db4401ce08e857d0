"""Packaging: pyproject.toml as the Comfy Registry reads it, requirements.txt matching it, the changelog,
and the install / workflow docs covering every workflow.

Registry rules: https://docs.comfy.org/registry/specifications (name: letters, digits, '-', '_',
'.', no leading digit or special character, no doubled special characters, no "ComfyUI" in it;
SemVer X.Y.Z version; a Repository url; [tool.comfy] PublisherId).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def normalised(requirements: list[str]) -> set[str]:
    return {str(Requirement(r)).lower().replace("_", "-") for r in requirements}


def test_project_section_meets_the_registry_rules(pyproject):
    project = pyproject["project"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name), name
    assert not re.search(r"[._-]{2}", name), f"{name}: doubled special characters"
    assert "comfyui" not in name.lower(), f"{name}: the registry asks for names without 'ComfyUI'"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), f"version {project['version']!r} is not X.Y.Z"
    assert project.get("description", "").strip()
    license_file = (project.get("license") or {}).get("file")
    assert license_file and (ROOT / license_file).is_file(), f"license file {license_file!r} missing"
    SpecifierSet(project["requires-python"])  # parses
    urls = project.get("urls") or {}
    assert urlparse(urls.get("Repository", "")).scheme == "https", f"[project.urls] Repository: {urls}"


def test_tool_comfy_section(pyproject, comfyui_path):
    comfy = pyproject["tool"]["comfy"]
    assert comfy.get("PublisherId", "").strip(), "[tool.comfy] PublisherId is required"
    assert comfy.get("DisplayName", "").strip()
    icon = comfy.get("Icon", "")
    if icon:
        # A raw.githubusercontent.com url of this repository's main branch: the file must exist here.
        parts = urlparse(icon).path.strip("/").split("/")
        assert urlparse(icon).netloc == "raw.githubusercontent.com" and len(parts) > 3, icon
        local = ROOT.joinpath(*parts[3:])
        assert local.is_file(), f"Icon {icon} points at {local.relative_to(ROOT)}, which does not exist"
        assert local.suffix.lower() in (".svg", ".png", ".jpg", ".jpeg", ".gif"), icon
    # The ComfyUI the whole suite runs against satisfies requires-comfyui.
    namespace: dict = {}
    exec((comfyui_path / "comfyui_version.py").read_text(), namespace)
    tested = Version(namespace["__version__"])
    assert tested in SpecifierSet(comfy["requires-comfyui"]), (
        f"requires-comfyui {comfy['requires-comfyui']!r} excludes the tested ComfyUI {tested}")


def test_requirements_txt_matches_pyproject_dependencies(pyproject):
    from_requirements = normalised(requirement_lines(ROOT / "requirements.txt"))
    from_pyproject = normalised(pyproject["project"].get("dependencies", []))
    assert from_requirements == from_pyproject, (
        f"requirements.txt {sorted(from_requirements)} != pyproject dependencies {sorted(from_pyproject)}")


def test_changelog_has_the_current_version(pyproject):
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = pyproject["project"]["version"]
    assert re.search(rf"^## \[{re.escape(version)}\]", changelog, re.M), f"CHANGELOG.md has no '## [{version}]'"


def test_install_doc_covers_manager_clone_and_model_folders():
    text = (ROOT / "docs" / "install.md").read_text()
    for needed in ("ComfyUI-Manager", "git clone", "custom_nodes", "models/checkpoints"):
        assert needed in text, f"docs/install.md does not mention {needed!r}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_is_documented_with_a_screenshot(path):
    text = (ROOT / "docs" / "workflows.md").read_text()
    assert f"workflows/{path.name}" in text, (
        f"docs/workflows.md does not describe {path.name}: run `make workflows-docs`")
    screenshot = ROOT / "docs" / "screenshots" / f"workflow_{path.stem}.png"
    assert screenshot.is_file(), f"{screenshot.relative_to(ROOT)} missing: run `make screenshots`"
    assert f"screenshots/{screenshot.name}" in text, f"docs/workflows.md does not show {screenshot.name}"


def test_workflows_doc_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qkv_workflows_doc", ROOT / "scripts" / "workflows_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "workflows.md").read_text()
    assert current == module.render(), "docs/workflows.md is out of date: run `make workflows-docs`"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_has_a_template_thumbnail(path):
    # The template browser shows workflows/<name>.jpg on the workflow's card (and logs a 404 without it).
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.relative_to(ROOT)} missing: run `make screenshots`"
