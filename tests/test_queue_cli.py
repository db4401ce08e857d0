"""The batch queueing CLI (`python -m client.queue`) against the real test server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkv_control.client.downloads import relative_output_path, save_output
from qkv_control.client.prompt_api import history_entry
from qkv_control.client.sweep import Axis, Sweep, UsageError, parse_values

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "workflows" / "baseline_txt2img.json"


def test_parse_values():
    assert parse_values("1..3") == [1, 2, 3]
    assert parse_values("0..10:5") == [0, 5, 10]
    assert parse_values("3..1") == [3, 2, 1]
    assert parse_values('["a cat", "a dog"]') == ["a cat", "a dog"]
    assert parse_values("7.5") == [7.5]
    assert parse_values("a lighthouse... at dusk") == ["a lighthouse... at dusk"]
    with pytest.raises(UsageError):
        parse_values("[]")


def test_sweep_product_and_zip():
    sweep = Sweep(axes={"K.seed": Axis((("5", "seed"),), [1, 2, 3]), "P.text": Axis((("6", "text"),), ["a", "b"])})
    items = sweep.items()
    assert len(items) == 6 and {"K.seed": 3, "P.text": "b"} in items
    with pytest.raises(UsageError):
        sweep.items(zipped=True)


def _cli(server_url: str, out: Path, *extra: str, seeds: int = 3, steps: int = 6) -> list[str]:
    return [sys.executable, "-m", "client.queue", str(BASELINE), "--out", str(out), "--server", server_url, "--tiny",
            "--set", f"KSampler.seed=1..{seeds}",
            "--set", 'Positive.text=["a red fox in the snow", "a lighthouse at dusk"]',
            "--set", "Empty Latent Image.width=64", "--set", "Empty Latent Image.height=64",
            "--set", f"KSampler.steps={steps}", *extra]


# The interrupted sweep: enough items, and steps, that the first run is still going when the test
# has seen two items done and sends SIGINT, even on a loaded 2-core machine.
INTERRUPTED_SWEEP = {"seeds": 6, "steps": 12}
INTERRUPTED_ITEMS = 2 * INTERRUPTED_SWEEP["seeds"]


def _manifest_items(out: Path) -> list[dict]:
    path = out / "manifest.json"
    try:
        return json.loads(path.read_text())["items"] if path.exists() else []
    except ValueError:  # replaced while reading
        return []


@pytest.mark.server
def test_sweep_interrupted_and_resumed(comfy_server, tmp_path):
    out = tmp_path / "sweep"
    # Ctrl-C as in a terminal: SIGINT at its default, also where this suite runs as a background job
    # (`make test`'s second pass), which a shell starts with SIGINT ignored, inherited by children.
    first = subprocess.Popen(_cli(comfy_server.url, out, **INTERRUPTED_SWEEP), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            if sum(i["status"] == "done" for i in _manifest_items(out)) >= 2:
                break
            time.sleep(0.05)
        assert first.poll() is None, f"the first run ended before it could be interrupted:\n{first.stdout.read()}"
        first.send_signal(signal.SIGINT)
        first_output = first.communicate(timeout=60)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, first_output
    done_first = {i["key"]: i["prompt_id"] for i in _manifest_items(out) if i["status"] == "done"}
    assert 2 <= len(done_first) < INTERRUPTED_ITEMS, first_output

    # Resume with a second "server" (the same one under another name): items spread over two workers.
    second_server = comfy_server.url.replace("127.0.0.1", "localhost")
    second = subprocess.run(_cli(comfy_server.url, out, "--server", second_server, **INTERRUPTED_SWEEP), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    items = _manifest_items(out)
    assert len(items) == INTERRUPTED_ITEMS and all(i["status"] == "done" for i in items)
    # Finished items were not run again.
    assert {k: i["prompt_id"] for i in items for k in [i["key"]] if k in done_first} == done_first
    files = [f for i in items for f in i["files"]]
    assert len(files) == INTERRUPTED_ITEMS and len(set(files)) == INTERRUPTED_ITEMS
    assert all((out / f).is_file() for f in files)
    assert {i["server"] for i in items} == {comfy_server.url, second_server}
    assert {(i["params"]["KSampler.seed"], i["params"]["Positive.text"]) for i in items} == {
        (s, t) for s in range(1, INTERRUPTED_SWEEP["seeds"] + 1) for t in ("a red fox in the snow", "a lighthouse at dusk")}
    # Different seeds give different images.
    assert len({(out / f).read_bytes() for f in files}) == INTERRUPTED_ITEMS


@pytest.mark.server
def test_failures_exit_nonzero_with_summary(comfy_server, tmp_path):
    # No tiny substitution and a checkpoint the server does not have: it rejects every item.
    cmd = [a for a in _cli(comfy_server.url, tmp_path / "bad") if a != "--tiny"]
    cmd += ["--set", "Load Checkpoint.ckpt_name=qkv_no_such_checkpoint.safetensors"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "6 item(s) failed" in result.stdout
    assert "ckpt_name" in result.stdout  # the server's node error is shown


@pytest.mark.server
def test_unknown_node_is_a_usage_error(comfy_server, tmp_path):
    cmd = _cli(comfy_server.url, tmp_path / "usage") + ["--set", "No Such Node.seed=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no node 'No Such Node'" in result.stderr, result.stderr


@pytest.mark.server
def test_image_folder_is_uploaded_and_swept(comfy_server, tmp_path):
    import numpy as np
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    originals = {}
    for name in ("a.png", "b.png"):
        pixels = rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(refs / name)
        originals[name] = pixels
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}, "_meta": {"title": "Reference"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inverted"}},
    }
    workflow_path = tmp_path / "invert_api.json"
    workflow_path.write_text(json.dumps(workflow))
    out = tmp_path / "inverted"
    result = subprocess.run([sys.executable, "-m", "client.queue", str(workflow_path), "--out", str(out),
                             "--server", comfy_server.url, "--images", f"Reference.image={refs}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    items = _manifest_items(out)
    assert len(items) == 2
    for item in items:
        source = Path(item["params"]["Reference.image"]).name
        (output,) = item["files"]
        got = np.asarray(Image.open(out / output).convert("RGB"))
        # ComfyUI rounds down when it converts back to 8 bits: off by at most one.
        np.testing.assert_allclose(got.astype(int), 255 - originals[source].astype(int), atol=1)


@pytest.mark.parametrize("output, expected", [
    ({"subfolder": "", "filename": "a.png"}, "007_a.png"),
    ({"subfolder": "left", "filename": "a.png"}, "left/007_a.png"),
    ({"subfolder": "left/deeper", "filename": "a.png"}, "left/deeper/007_a.png"),
    ({"subfolder": "../x", "filename": "a.png"}, "x/007_a.png"),
    ({"subfolder": "../../..", "filename": "a.png"}, "007_a.png"),
    ({"subfolder": "/etc/cron.d", "filename": "a.png"}, "etc/cron.d/007_a.png"),
    ({"subfolder": "C:\\Windows\\..\\System32", "filename": "a.png"}, "C_/Windows/System32/007_a.png"),
    ({"subfolder": "ok", "filename": "../../evil.png"}, "ok/007_evil.png"),
])
def test_output_paths_keep_the_subfolder_and_stay_inside(output, expected):
    assert relative_output_path(output, prefix="007_").as_posix() == expected


def test_saving_never_overwrites_and_never_leaves_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    first = save_output(out, relative_output_path({"subfolder": "s", "filename": "a.png"}), b"first")
    second = save_output(out, relative_output_path({"subfolder": "s", "filename": "a.png"}), b"second")
    assert (first.as_posix(), second.as_posix()) == ("s/a.png", "s/a_2.png")
    assert (out / "s" / "a.png").read_bytes() == b"first" and (out / "s" / "a_2.png").read_bytes() == b"second"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OSError, match="outside"):
        save_output(out, relative_output_path({"subfolder": "link", "filename": "a.png"}), b"x")
    assert not any(outside.iterdir())


@pytest.mark.server
def test_same_names_in_different_subfolders_are_both_kept(comfy_server, tmp_path):
    import numpy as np
    from PIL import Image

    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "indetail_reference.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "left/same"}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "right/same"}},
    }
    workflow_path = tmp_path / "two_subfolders_api.json"
    workflow_path.write_text(json.dumps(workflow))
    out = tmp_path / "kept"
    # A file of the user's where the first output would go: it must survive the run untouched.
    (out / "left").mkdir(parents=True)
    users_file = out / "left" / "000_same_00001_.png"
    users_file.write_bytes(b"the user's own file")
    result = subprocess.run([sys.executable, "-m", "client.queue", str(workflow_path), "--out", str(out),
                             "--server", comfy_server.url], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (item,) = _manifest_items(out)
    files = sorted(item["files"])
    assert [Path(f).parent.as_posix() for f in files] == ["left", "right"], files
    assert users_file.read_bytes() == b"the user's own file"
    left, right = (np.asarray(Image.open(out / f).convert("RGB"), dtype=int) for f in files)
    # The image and its inverse (ComfyUI rounds down converting back to 8 bits: off by at most one).
    np.testing.assert_allclose(left + right, np.full_like(left, 255), atol=1)
    assert left.std() > 1.0


@pytest.mark.server
def test_blueprint_widget_sweep_sets_every_input_it_feeds(comfy_server, tmp_path):
    # A saved workflow with the InDetail-IP blueprint in it: sweeping the subgraph node's `steps`
    # must change the DDIM inversion and the sampler together (one schedule), as the node does.
    from qkv_control.client.blueprints import wrap_in_blueprint

    info = comfy_server.object_info()
    blueprint = json.loads((ROOT / "subgraphs" / "QKV Image Prompt (InDetail-IP).json").read_text())
    source = json.loads((ROOT / "workflows" / "indetail_ip_image_variation.json").read_text())
    workflow_path = tmp_path / "with_blueprint.json"
    workflow_path.write_text(json.dumps(wrap_in_blueprint(source, blueprint, info)))
    node = "QKV Image Prompt (InDetail-IP)"
    out = tmp_path / "blueprint_sweep"
    result = subprocess.run([sys.executable, "-m", "client.queue", str(workflow_path), "--out", str(out), "--tiny",
                             "--server", comfy_server.url, "--set", f"{node}.steps=2..3",
                             "--set", f"{node}.width=128", "--set", f"{node}.height=128"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    items = _manifest_items(out)
    assert sorted(i["params"][f"{node}.steps"] for i in items) == [2, 3]
    for item in items:
        entry = history_entry(comfy_server.url, item["prompt_id"])
        prompt = entry["prompt"][2]
        steps = {n["class_type"]: n["inputs"]["steps"] for n in prompt.values() if "steps" in n["inputs"]}
        assert steps == {"QKVDDIMInversion": item["params"][f"{node}.steps"],
                         "KSamplerAdvanced": item["params"][f"{node}.steps"]}, steps
        assert all(":" in key for key, n in prompt.items() if n["class_type"] == "QKVDDIMInversion")
        assert (out / item["files"][0]).is_file()
