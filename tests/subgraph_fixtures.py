"""A saved workflow with nested subgraphs, in the frontend's format, for the CLI/frontend comparison.

Root: a checkpoint feeds two instances (10 and 13) of subgraph "Outer"; 10's output goes to a
SaveImage whose file name prefix comes from a Primitive, 13's (model through a Reroute, seed
from a Primitive) to a PreviewImage. "Outer" encodes its promoted ``text``, makes a latent,
passes it through a Reroute and a bypassed LatentUpscaleBy into a nested instance (6) of
subgraph "Inner", decodes it and also has a muted ImageInvert. "Inner" is one KSampler whose
``seed`` and ``steps`` are promoted widgets; Outer's ``seed`` input is wired to the nested
seed, so the outermost value wins; ``steps`` stays at the nested instance's value. Node ids
clash across the graphs (every graph has a node 1), as in a hand-made file.

``EXPECTED_PROMPT`` is the prompt worked out by hand from the frontend's rules (see
client/subgraphs.py); tests/test_workflow_format.py checks the CLI against it and
tests/test_browser.py checks the real frontend builds the same.
"""

from __future__ import annotations

OUTER_ID = "6b1c2a40-1f00-4a6e-9d5e-0a0000000001"
INNER_ID = "6b1c2a40-1f00-4a6e-9d5e-0a0000000002"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def _node(node_id, type_, inputs=(), outputs=(), widgets=None, mode=0, title=None, pos=(0, 0), size=(260, 120)):
    node = {"id": node_id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": 0, "mode": mode,
            "inputs": [dict(name=n, type=t, link=link, **({"widget": {"name": n}} if w else {}))
                       for n, t, link, w in inputs],
            "outputs": [o if isinstance(o, dict) else {"name": o[0], "type": o[1], "links": list(o[2])} for o in outputs],
            "properties": {}}
    if widgets is not None:
        node["widgets_values"] = list(widgets)
    if title:
        node["title"] = title
    return node


def _link(link_id, origin, origin_slot, target, target_slot, type_):
    return {"id": link_id, "origin_id": origin, "origin_slot": origin_slot, "target_id": target,
            "target_slot": target_slot, "type": type_}


def _io(prefix, entries):
    return [{"id": f"{prefix}-{index:04d}-0000-0000-000000000000", "name": name, "type": type_, "linkIds": list(links),
             "localized_name": name, "pos": [0, 20 * index]} for index, (name, type_, links) in enumerate(entries)]


def _definition(definition_id, name, inputs, outputs, nodes, links):
    return {"id": definition_id, "version": 1,
            "state": {"lastGroupId": 0, "lastNodeId": max(n["id"] for n in nodes),
                      "lastLinkId": max(link["id"] for link in links), "lastRerouteId": 0},
            "revision": 0, "config": {}, "name": name,
            "inputNode": {"id": -10, "bounding": [-300, 0, 120, 140]},
            "outputNode": {"id": -20, "bounding": [1400, 0, 120, 60]},
            "inputs": _io("00000000", inputs), "outputs": _io("11111111", outputs), "widgets": [],
            "nodes": nodes, "groups": [], "links": links, "extra": {}}


def nested_subgraph_workflow() -> dict:
    inner = _definition(INNER_ID, "Inner", [
        ("model", "MODEL", [201]), ("positive", "CONDITIONING", [202]), ("negative", "CONDITIONING", [203]),
        ("latent_image", "LATENT", [204]), ("seed", "INT", [205]), ("steps", "INT", [206])],
        [("LATENT", "LATENT", [207])],
        [_node(1, "KSampler", [("model", "MODEL", 201, False), ("positive", "CONDITIONING", 202, False),
                               ("negative", "CONDITIONING", 203, False), ("latent_image", "LATENT", 204, False),
                               ("seed", "INT", 205, True), ("steps", "INT", 206, True)],
               [("LATENT", "LATENT", [207])], [99, "fixed", 20, 7.0, "euler", "normal", 1.0], pos=(0, 0),
               size=(300, 260))],
        [_link(201, -10, 0, 1, 0, "MODEL"), _link(202, -10, 1, 1, 1, "CONDITIONING"),
         _link(203, -10, 2, 1, 2, "CONDITIONING"), _link(204, -10, 3, 1, 3, "LATENT"),
         _link(205, -10, 4, 1, 4, "INT"), _link(206, -10, 5, 1, 5, "INT"), _link(207, 1, 0, -20, 0, "LATENT")])
    outer = _definition(OUTER_ID, "Outer", [
        ("model", "MODEL", [107]), ("clip", "CLIP", [101, 103]), ("vae", "VAE", [112]), ("text", "STRING", [102]),
        ("seed", "INT", [110])],
        [("IMAGE", "IMAGE", [113])],
        [_node(1, "CLIPTextEncode", [("clip", "CLIP", 101, False), ("text", "STRING", 102, True)],
               [("CONDITIONING", "CONDITIONING", [108])], ["inner default text"], title="Positive", pos=(0, 0)),
         _node(2, "CLIPTextEncode", [("clip", "CLIP", 103, False)], [("CONDITIONING", "CONDITIONING", [109])],
               ["bad"], title="Negative", pos=(0, 200)),
         _node(3, "EmptyLatentImage", [], [("LATENT", "LATENT", [104])], [64, 64, 1], pos=(0, 400)),
         _node(4, "Reroute", [("", "*", 104, False)], [("", "LATENT", [105])], pos=(300, 420), size=(75, 26)),
         _node(5, "LatentUpscaleBy", [("samples", "LATENT", 105, False)], [("LATENT", "LATENT", [106])],
               ["nearest-exact", 1.5], mode=4, pos=(400, 400)),
         _node(6, INNER_ID, [("model", "MODEL", 107, False), ("positive", "CONDITIONING", 108, False),
                             ("negative", "CONDITIONING", 109, False), ("latent_image", "LATENT", 106, False),
                             ("seed", "INT", 110, True), ("steps", "INT", None, True)],
               [("LATENT", "LATENT", [111])], [5, 3], title="Inner", pos=(700, 0), size=(300, 200)),
         _node(7, "VAEDecode", [("samples", "LATENT", 111, False), ("vae", "VAE", 112, False)],
               [("IMAGE", "IMAGE", [113, 114])], pos=(1050, 0)),
         _node(8, "ImageInvert", [("image", "IMAGE", 114, False)], [("IMAGE", "IMAGE", [])], mode=2,
               pos=(1050, 200))],
        [_link(101, -10, 1, 1, 0, "CLIP"), _link(102, -10, 3, 1, 1, "STRING"), _link(103, -10, 1, 2, 0, "CLIP"),
         _link(104, 3, 0, 4, 0, "LATENT"), _link(105, 4, 0, 5, 0, "LATENT"), _link(106, 5, 0, 6, 3, "LATENT"),
         _link(107, -10, 0, 6, 0, "MODEL"), _link(108, 1, 0, 6, 1, "CONDITIONING"),
         _link(109, 2, 0, 6, 2, "CONDITIONING"), _link(110, -10, 4, 6, 4, "INT"), _link(111, 6, 0, 7, 0, "LATENT"),
         _link(112, -10, 2, 7, 1, "VAE"), _link(113, 7, 0, -20, 0, "IMAGE"), _link(114, 7, 0, 8, 0, "IMAGE")])

    def outer_instance(node_id, links, widgets, pos):
        model, clip, vae, seed, out = links
        return _node(node_id, OUTER_ID, [("model", "MODEL", model, False), ("clip", "CLIP", clip, False),
                                         ("vae", "VAE", vae, False), ("text", "STRING", None, True),
                                         ("seed", "INT", seed, True)],
                     [("IMAGE", "IMAGE", out)], widgets, title="Outer", pos=pos, size=(320, 220))

    nodes = [
        _node(1, "CheckpointLoaderSimple", [], [("MODEL", "MODEL", [1, 11]), ("CLIP", "CLIP", [2, 7]),
                                                ("VAE", "VAE", [3, 8])], [CHECKPOINT], pos=(0, 0)),
        outer_instance(10, (1, 2, 3, None, [4]), ["a red fox", 11], (400, 0)),
        _node(11, "SaveImage", [("images", "IMAGE", 4, False), ("filename_prefix", "STRING", 5, True)], [],
              ["unused_prefix"], pos=(800, 0)),
        _node(12, "PrimitiveNode", [], [{"name": "STRING", "type": "STRING", "links": [5],
                                         "widget": {"name": "filename_prefix"}}], ["qkv_nested"], pos=(800, 300)),
        outer_instance(13, (6, 7, 8, 10, [9]), ["a lighthouse"], (400, 400)),
        _node(14, "PreviewImage", [("images", "IMAGE", 9, False)], [], pos=(800, 500)),
        _node(15, "PrimitiveNode", [], [{"name": "INT", "type": "INT", "links": [10], "widget": {"name": "seed"}}],
              [777, "fixed"], pos=(0, 600)),
        _node(16, "Reroute", [("", "*", 11, False)], [("", "MODEL", [6])], pos=(300, 420), size=(75, 26)),
        _node(17, "MarkdownNote", [], [], ["Nested subgraphs for the CLI/frontend comparison."], pos=(0, 800)),
    ]
    links = [[1, 1, 0, 10, 0, "MODEL"], [2, 1, 1, 10, 1, "CLIP"], [3, 1, 2, 10, 2, "VAE"], [4, 10, 0, 11, 0, "IMAGE"],
             [5, 12, 0, 11, 1, "STRING"], [6, 16, 0, 13, 0, "MODEL"], [7, 1, 1, 13, 1, "CLIP"], [8, 1, 2, 13, 2, "VAE"],
             [9, 13, 0, 14, 0, "IMAGE"], [10, 15, 0, 13, 4, "INT"], [11, 1, 0, 16, 0, "MODEL"]]
    return {"id": "6b1c2a40-1f00-4a6e-9d5e-0a00000000ff", "revision": 0, "last_node_id": 17, "last_link_id": 11,
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4,
            "definitions": {"subgraphs": [outer, inner]}}


def _sampler(seed: int, positive: str, negative: str, latent: str) -> dict:
    return {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
        "seed": seed, "steps": 3, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["1", 0], "positive": [positive, 0], "negative": [negative, 0], "latent_image": [latent, 0]}}


def _outer(prefix: str, text: str, seed: int) -> dict:
    # Node 1 of "Outer" and node 1 of "Inner" clash with the root's node 1: the frontend renumbers
    # them on load from the root's last node id (17), in definition order: 18 and 19.
    return {
        f"{prefix}:18": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
                        "inputs": {"text": text, "clip": ["1", 1]}},
        f"{prefix}:2": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"},
                        "inputs": {"text": "bad", "clip": ["1", 1]}},
        f"{prefix}:3": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
                        "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        # The bypassed upscale and the reroute pass the empty latent straight through.
        f"{prefix}:6:19": _sampler(seed, f"{prefix}:18", f"{prefix}:2", f"{prefix}:3"),
        f"{prefix}:7": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"},
                        "inputs": {"samples": [f"{prefix}:6:19", 0], "vae": ["1", 2]}},
    }


EXPECTED_PROMPT = {
    "1": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"}, "inputs": {"ckpt_name": CHECKPOINT}},
    # Instance 10: its own promoted values; the nested steps stay at the nested instance's 3.
    **_outer("10", "a red fox", 11),
    "11": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
           "inputs": {"filename_prefix": "qkv_nested", "images": ["10:7", 0]}},
    # Instance 13: seed is wired to a Primitive, which only writes widgets it links to directly,
    # so the KSampler keeps its own seed (99), as the frontend does.
    **_outer("13", "a lighthouse", 99),
    "14": {"class_type": "PreviewImage", "_meta": {"title": "Preview Image"}, "inputs": {"images": ["13:7", 0]}},
}
