"""The reference K/V bank on the real ComfyUI samplers with tiny models: a warm run equals the cold
one at the plain-sampling row count (InDetail-IP, MCA-Ctrl), every part of the key misses when it
changes, partial hits (other samplers, step counts, denoise), eviction under small budgets, an
interrupted cold run, A-B-A, stale patch objects, the node, the store's placement, step sizes.

Tolerance (CPU, fp32, 1 thread): a warm run runs the sampler rows in a smaller batch than the cold
run; the stream's K/V are the cold run's own tensors. Final latents agree within ``WARM_RTOL`` of
their largest value (measured: InDetail-IP 0, i.e. bit-identical; MCA-Ctrl replacement 8e-6).
"""

from __future__ import annotations

import copy
import functools
import gc

import pytest
import torch

import comfy.model_management
import nodes as comfy_nodes
from comfy.patcher_extension import WrappersMP

from helpers import encode, inverted_pair, sample
from qkv_control.attention import mca_ctrl as mca
from qkv_control.attention.rows import ROLE_REFERENCE, RowLayout
from qkv_control.inversion import kv_bank
from qkv_control.inversion.kv_bank import BANK
from qkv_control.mca_ctrl.config import AutoMask, Masks, Schedule, Streams
from qkv_control.mca_ctrl.control import MCACtrl
from qkv_control.nodes.ddim_inversion import QKVDDIMInversion
from qkv_control.nodes.image_prompt_guidance import QKVImagePromptGuidance
from qkv_control.nodes.indetail_ip import QKVInDetailReferenceAttention
from qkv_control.nodes.kv_bank import QKVReferenceKVBank
from qkv_control.patching.branch_rows import append_rows, borrowed_inputs
from qkv_control.patching.control import AttentionControl, ExtraRow
from qkv_control.patching.patch import add_control
from qkv_control.tiny.models import tiny_checkpoint

STEPS = 5  # ddim_uniform gives exactly this many steps when it divides 1000
SIZE = 16
SCHEDULER = "ddim_uniform"
DEFAULT_SCHEDULE = "stratified:0-0.2, concat:0.2-1"
WARM_RTOL = 2e-5


@pytest.fixture
def bank(monkeypatch):
    """The bank on (256 MiB), empty before and after the test."""
    monkeypatch.setenv(kv_bank.ENV_BUDGET, "256")
    BANK.clear()
    yield BANK
    BANK.clear()


@pytest.fixture(scope="module")
def kit():
    return make_kit()


def make_kit() -> dict:
    """The tiny SD1.5 model, its texts and inverted references (tests/test_kv_bank_memory.py too)."""
    model, clip, _ = tiny_checkpoint("sd15")
    positive, negative = encode(clip, "a red fox in the snow"), encode(clip, "bad quality")
    empty = encode(clip, "")

    def invert(seed, prompt=positive, negative_text=None, size=SIZE):
        latent = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))
        return QKVDDIMInversion.execute(model, {"samples": latent}, STEPS, SCHEDULER, prompt, negative_text).args[0]

    return {"model": model, "clip": clip, "positive": positive, "negative": negative,
            "reference": invert(3), "other": invert(4), "with_negative": invert(3, negative_text=empty),
            "other_prompt": invert(3, prompt=encode(clip, "a texture")), "invert": invert}


class Rows:
    """Batch rows of every UNet call of the model (a torch hook, not a ComfyUI patch)."""

    def __init__(self, model):
        self.rows: list[int] = []
        self._handle = model.model.diffusion_model.register_forward_pre_hook(
            lambda module, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def indetail(model, inversion, schedule=DEFAULT_SCHEDULE, blocks="output", policy=None):
    patched = QKVInDetailReferenceAttention.execute(model, inversion, blocks, schedule, 0.5, 0.5).args[0]
    return patched if policy is None else QKVImagePromptGuidance.execute(patched, policy).args[0]


def run(kit, model, positive=None, negative=None, **options):
    """(final latent, rows per UNet call) of one KSampler run."""
    options = {"steps": STEPS, "scheduler": SCHEDULER, "size": SIZE, **options}
    with Rows(kit["model"]) as rows:
        out = sample(model, positive or kit["positive"], negative or kit["negative"], **options)
    return out, rows.rows


def without_bank(model):
    """``model`` with the bank switched off (the Reference K/V Bank node): the cold path, nothing
    read or stored, what the bank holds kept."""
    return QKVReferenceKVBank.execute(model, False, 0).args[0]


def assert_warm_equals(warm, cold):
    scale = float(cold.abs().max())
    diff = float((warm - cold).abs().max())
    assert diff <= WARM_RTOL * scale, f"warm differs from cold by {diff:.3e} ({diff / scale:.2e} of the largest value)"


# ----------------------------------------------------------------- cold and warm: InDetail-IP

@pytest.mark.parametrize("batch", [1, 2])
def test_indetail_warm_run_costs_plain_rows_and_equals_cold(kit, bank, monkeypatch, batch):
    """Default (Stratified then concat, conflict-free): the cold run computes the reference row
    (2N+1 rows per step) and fills the bank; the warm run appends no row (2N, plain sampling's count)
    and gives the cold run's latents. The cold run with the bank equals a run without it exactly."""
    model = indetail(kit["model"], kit["reference"])
    cold, cold_rows = run(kit, model, batch=batch)
    assert cold_rows == [2 * batch + 1] * STEPS
    assert bank.stats().steps == STEPS
    warm, warm_rows = run(kit, model, batch=batch, seed=0)
    assert warm_rows == [2 * batch] * STEPS
    assert_warm_equals(warm, cold)
    off, _ = run(kit, without_bank(model), batch=batch)
    assert torch.equal(off, cold)


def test_indetail_policy_both_with_a_negative_text_is_warm_at_two_rows(kit, bank):
    """``both`` with the reference's negative text (official ``sain: all``): two reference rows per
    step cold (2N+2), none warm; each branch's row is its own bank stream (role and text)."""
    model = indetail(kit["model"], kit["with_negative"], policy="both")
    cold, cold_rows = run(kit, model)
    assert cold_rows == [4] * STEPS and bank.stats().streams == 2
    warm, warm_rows = run(kit, model)
    assert warm_rows == [2] * STEPS
    assert_warm_equals(warm, cold)


def test_indetail_separate_cfg_calls_are_warm_too(kit, bank):
    """A ControlNet on the positive side only makes ComfyUI run cond and uncond in separate calls:
    cold, the positive call carries the reference row (2 + 1 rows per step); warm, 1 + 1."""
    from qkv_control.tiny.controlnet import cached_tiny_controlnet

    hint = torch.rand(1, SIZE * 8, SIZE * 8, 3, generator=torch.Generator().manual_seed(0))
    (controlled,) = comfy_nodes.ControlNetApply().apply_controlnet(kit["positive"], cached_tiny_controlnet("sd15"),
                                                                  hint, 1.0)
    controlled = [[c, {k: v for k, v in d.items() if k != "control_apply_to_uncond"}] for c, d in controlled]
    model = indetail(kit["model"], kit["reference"])
    cold, cold_rows = run(kit, model, positive=controlled)
    assert sorted(cold_rows) == sorted([2, 1] * STEPS)
    warm, warm_rows = run(kit, model, positive=controlled)
    assert warm_rows == [1, 1] * STEPS
    assert_warm_equals(warm, cold)


def test_controlnet_does_not_reach_the_stream(kit, bank, monkeypatch):
    """Extra rows get zero ControlNet residuals, so the bank filled without a ControlNet serves a
    run with one (both branches controlled), equal to that run without the bank."""
    from qkv_control.tiny.controlnet import cached_tiny_controlnet

    model = indetail(kit["model"], kit["reference"])
    run(kit, model)  # fills the bank, no ControlNet
    hint = torch.rand(1, SIZE * 8, SIZE * 8, 3, generator=torch.Generator().manual_seed(0))
    cn_pos, cn_neg = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        kit["positive"], kit["negative"], cached_tiny_controlnet("sd15"), hint, 1.0, 0.0, 1.0)
    warm, rows = run(kit, model, positive=cn_pos, negative=cn_neg)
    assert rows == [2] * STEPS
    off, _ = run(kit, without_bank(model), positive=cn_pos, negative=cn_neg)
    assert_warm_equals(warm, off)


# -------------------------------------------------------------------- cold and warm: MCA-Ctrl

def _box(top, left, height, width):
    m = torch.zeros((1, SIZE * 8, SIZE * 8))
    m[:, top:top + height, left:left + width] = 1.0
    return m


@pytest.fixture(scope="module")
def streams(kit):
    return inverted_pair(kit["model"], SIZE, STEPS)


def mca_model(kit, streams, policy=None, generation=False):
    subject, scene = streams
    if generation:
        masks = Masks(_box(32, 32, 64, 64), None, auto=AutoMask((5,)))
        control = MCACtrl(Streams(subject), masks, Schedule(mca.PhaseSchedule(0.5, 1.0)))
    else:
        control = MCACtrl(Streams(subject, scene), Masks(_box(32, 32, 64, 64), _box(48, 16, 64, 80)),
                          Schedule(mca.PhaseSchedule(0.5, 1.0)))
    model = add_control(kit["model"], control)
    return model if policy is None else QKVImagePromptGuidance.execute(model, policy).args[0]


@pytest.mark.parametrize("policy,cold", [(None, 6), ("positive_only", 4)])
def test_mca_replacement_warm_run_costs_plain_rows(kit, streams, bank, policy, cold):
    """Replacement: subject and scene rows per controlled branch (official: both branches, 6 rows;
    conflict-free 4); warm: 2 rows at every step, SAGI steps included (the bank holds the streams'
    queries there), and the cold run's latents."""
    model = mca_model(kit, streams, policy)
    first, rows = run(kit, model, scheduler="normal")
    assert rows == [cold] * STEPS
    warm, rows = run(kit, model, scheduler="normal")
    assert rows == [2] * STEPS
    assert_warm_equals(warm, first)


def test_mca_generation_warm(kit, streams, bank):
    """Generation with the automatic mask: the first step is plain (2 rows), then a subject row per
    branch (4); warm 2 everywhere."""
    model = mca_model(kit, streams, generation=True)
    positive = encode(kit["clip"], "a photo of a dog")
    first, rows = run(kit, model, positive=positive, scheduler="normal")
    assert rows == [2] + [4] * (STEPS - 1)
    warm, rows = run(kit, model, positive=positive, scheduler="normal")
    assert rows == [2] * STEPS
    assert_warm_equals(warm, first)


def test_mca_streams_follow_the_branch_text(kit, streams, bank):
    """MCA-Ctrl's stream rows run with their CFG branch's text: a new seed is warm; a new prompt
    misses the positive branch's streams and hits the negative branch's (official mode: 4 rows)."""
    model = mca_model(kit, streams)
    run(kit, model, scheduler="normal")
    _, rows = run(kit, model, scheduler="normal", seed=7)
    assert rows == [2] * STEPS
    _, rows = run(kit, model, positive=encode(kit["clip"], "a cat"), scheduler="normal")
    assert rows == [4] * STEPS


# ------------------------------------------------------------------------ the key

class TouchesStreams(AttentionControl):
    """A control that declares it changes other controls' stream rows (acts on no layer here)."""

    changes_stream_rows = True


def _identity_output_patch(h, extra_options):
    return h


def _passthrough(executor, *args, **kwargs):
    return executor(*args, **kwargs)


def _variants(kit):
    model = kit["model"]

    def lora():
        m = model.clone()
        name = next(k for k in m.model.state_dict() if k.endswith("output_blocks.9.1.transformer_blocks.0.attn1.to_k.weight"))
        weight = m.model.state_dict()[name]
        m.add_patches({name: (torch.randn_like(weight) * 0.05,)}, 1.0)
        return m

    def object_patch():
        m = model.clone()
        m.add_object_patch("model_sampling", copy.deepcopy(model.get_model_object("model_sampling")))
        return m

    def attention_patch():
        m = model.clone()
        m.set_model_attn1_output_patch(_identity_output_patch)
        return m

    def wrapper():
        m = model.clone()
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "another_pack", _passthrough)
        return m

    return {
        "reference image": lambda: (indetail(model, kit["other"]), {}),
        "inversion prompt": lambda: (indetail(model, kit["other_prompt"]), {}),
        "weight patch (LoRA)": lambda: (indetail(lora(), kit["reference"]), {}),
        "object patch": lambda: (indetail(object_patch(), kit["reference"]), {}),
        "another pack's attention patch": lambda: (indetail(attention_patch(), kit["reference"]), {}),
        "another pack's wrapper": lambda: (indetail(wrapper(), kit["reference"]), {}),
        "latent size": lambda: (indetail(model, kit["reference"]), {"size": SIZE + 4}),
        "layers read (other layers)": lambda: (indetail(model, kit["reference"], blocks="input"), {}),
        "a control changing stream rows": lambda: (add_control(indetail(model, kit["reference"]), TouchesStreams()), {}),
    }


VARIANTS = list(_variants({"model": None, "other": None, "other_prompt": None, "reference": None}))


@pytest.mark.parametrize("part", VARIANTS)
def test_each_part_of_the_key_misses(kit, bank, monkeypatch, part):
    """With the bank filled by the default graph, changing one part of the key computes the
    reference row at every step, and gives exactly the run without the bank."""
    run(kit, indetail(kit["model"], kit["reference"]))
    model, options = _variants(kit)[part]()
    out, rows = run(kit, model, **options)
    assert rows == [3] * STEPS, part
    off, _ = run(kit, without_bank(model), **options)
    assert torch.equal(out, off)


def test_fewer_layers_read_hit_and_the_seed_and_prompt_are_not_in_the_key(kit, bank, monkeypatch):
    """A run reading a subset of the layers the bank holds is served by it (a stream's K/V do not
    depend on which layers read them); a new seed and a new prompt are warm (InDetail-IP's
    reference row has the inversion's text)."""
    run(kit, indetail(kit["model"], kit["reference"]))
    subset = indetail(kit["model"], kit["reference"], blocks="output:9-11")
    warm, rows = run(kit, subset)
    assert rows == [2] * STEPS
    off, _ = run(kit, without_bank(subset))
    assert_warm_equals(warm, off)
    _, rows = run(kit, indetail(kit["model"], kit["reference"]), positive=encode(kit["clip"], "a boat"), seed=5)
    assert rows == [2] * STEPS


def test_a_freed_patch_object_drops_its_entries(kit, bank):
    """An entry keyed by a patch object's id is dropped once that object is freed (its id could
    name another object next)."""
    def wrapper(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    m = kit["model"].clone()
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "another_pack", wrapper)
    run(kit, indetail(m, kit["reference"]))
    assert bank.stats().streams == 1
    m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, "another_pack")  # the last holder of the wrapper
    del wrapper
    gc.collect()
    assert bank.stats().streams == 0 and bank.stats().nbytes == 0


def test_borrowed_inputs_are_what_append_rows_copies():
    """The per-row inputs an extra row takes from the template row (``append_rows``) are exactly
    what ``borrowed_inputs`` reports, so the bank keys on them."""
    layout = RowLayout.from_cond_or_uncond([1, 0], 2)
    x = torch.randn(2, 4, 8, 8)
    c_concat = torch.randn(2, 5, 8, 8)
    conds = {"y": torch.randn(2, 16), "guidance": torch.tensor([3.0, 3.5]), "scalar": 1.0,
             "ref_latents": [torch.randn(2, 4, 8, 8)]}
    row = ExtraRow(ROLE_REFERENCE, torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8), conds={"y": torch.randn(1, 16)})
    _, _, concat_ext, _, _, conds_ext, _ = append_rows(x, torch.ones(2), c_concat, torch.randn(2, 77, 8), None,
                                                       conds, layout, [("ref", row)])
    borrowed = borrowed_inputs(c_concat, conds, layout, 2, row.conds)
    assert set(borrowed) == {"c_concat", "guidance", "ref_latents"}
    assert torch.equal(borrowed["c_concat"], concat_ext[2:])
    assert torch.equal(borrowed["guidance"], conds_ext["guidance"][2:])
    assert torch.equal(borrowed["ref_latents"][0], conds_ext["ref_latents"][0][2:])


# --------------------------------------------------------------------- partial hits

@pytest.mark.parametrize("options,hits", [
    ({"sampler": "dpmpp_2s_ancestral"}, "some"),        # midpoints between the schedule's sigmas miss
    ({"steps": STEPS - 2}, "some"),                     # other sigmas, the last ones shared
    ({"denoise": 0.5}, "some"),                         # the tail of a 10-step schedule: every other sigma
    ({"sampler": "euler_ancestral", "seed": 3}, "all"),  # the same sigmas, other noise
])
def test_partial_hits_compute_the_missing_steps(kit, bank, monkeypatch, options, hits):
    """After a default run, other samplers, step counts and denoise < 1 read the bank where a sigma
    is held and compute the row elsewhere; the result is that of the run without the bank."""
    model = indetail(kit["model"], kit["reference"])
    run(kit, model)
    out, rows = run(kit, model, **options)
    off, off_rows = run(kit, without_bank(model), **options)
    warm_calls = sum(1 for r, o in zip(rows, off_rows) if r == o - 1)
    assert len(rows) == len(off_rows)
    assert {"some": 0 < warm_calls < len(rows), "none": warm_calls == 0, "all": warm_calls == len(rows)}[hits], rows
    assert_warm_equals(out, off)


# ------------------------------------------------------------------------ memory

def test_a_budget_for_part_of_the_steps_keeps_the_first_steps(kit, bank, monkeypatch):
    """A budget of 2.5 steps: the cold run stores its first two steps and admits no more (it does
    not evict its own); the warm run reads those two and computes the rest, equal to cold."""
    model = indetail(kit["model"], kit["reference"])
    run(kit, model)
    per_step = bank.stats().nbytes / STEPS
    bank.clear()
    monkeypatch.setenv(kv_bank.ENV_BUDGET, str(2.5 * per_step / kv_bank.MB))
    cold, rows = run(kit, model)
    assert rows == [3] * STEPS and bank.stats().steps == 2
    warm, rows = run(kit, model)
    assert rows == [2, 2] + [3] * (STEPS - 2)
    assert_warm_equals(warm, cold)


def test_lru_eviction_between_references_costs_time_not_correctness(kit, bank, monkeypatch):
    """A budget of 1.5 references: B evicts A's least recently used steps (A's run is over); A
    again recomputes those and reads the rest; every output equals its run without the bank."""
    model_a, model_b = indetail(kit["model"], kit["reference"]), indetail(kit["model"], kit["other"])
    run(kit, model_a)
    per_reference = bank.stats().nbytes
    bank.clear()
    monkeypatch.setenv(kv_bank.ENV_BUDGET, str(1.5 * per_reference / kv_bank.MB))
    a1, _ = run(kit, model_a)
    b, rows = run(kit, model_b)
    kept = int(1.5 * STEPS) - STEPS  # A's most recently used steps that B left
    assert rows == [3] * STEPS and bank.stats().steps == STEPS + kept
    a2, rows = run(kit, model_a)
    assert rows == [3] * (STEPS - kept) + [2] * kept
    assert_warm_equals(a2, a1)
    off_b, _ = run(kit, without_bank(model_b))
    assert torch.equal(b, off_b)


def test_a_budget_below_one_step_stores_nothing(kit, bank, monkeypatch):
    monkeypatch.setenv(kv_bank.ENV_BUDGET, "0.01")
    model = indetail(kit["model"], kit["reference"])
    first, _ = run(kit, model)
    again, rows = run(kit, model)
    assert rows == [3] * STEPS and bank.stats().steps == 0 and torch.equal(first, again)


def test_an_interrupted_cold_run_leaves_only_complete_steps(kit, bank):
    """Interrupted inside the UNet at step 3, after some decoder layers recorded the reference's
    K/V and before the others: only steps 0-2 are in the bank; the next run reads them, computes
    the rest, and equals an uninterrupted cold run."""
    model = indetail(kit["model"], kit["reference"])
    unet = kit["model"].model.diffusion_model
    calls = []
    count = unet.register_forward_pre_hook(lambda module, args: calls.append(1))

    def interrupt(module, args):
        if len(calls) == 4:
            raise comfy.model_management.InterruptProcessingException()

    stop = unet.output_blocks[9][0].register_forward_pre_hook(interrupt)  # the ResBlock before its attention
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(kit, model)
    finally:
        count.remove()
        stop.remove()
    assert bank.stats().steps == 3
    after, rows = run(kit, model)
    assert rows == [2] * 3 + [3] * (STEPS - 3)
    bank.clear()
    cold, _ = run(kit, model)
    assert_warm_equals(after, cold)


def test_entries_move_to_the_offload_device_and_stay_correct():
    """The store's placement: a step goes on the compute device while the room allows, else on
    the offload device; ``make_room`` (a run's start, before its models load) moves the least
    recently used ones off; lookups return the same values from either place. (CPU here: both
    devices are the CPU, the bookkeeping is what is tested.)"""
    store = kv_bank.KVBank()
    cpu = torch.device("cpu")
    step = {("output", 9, 0): {"k": torch.randn(1, 4, 8), "v": torch.randn(1, 4, 8)}}
    nbytes = 2 * 4 * 8 * 4
    token = store.begin_run(10 * nbytes, room=2 * nbytes, offload_device=cpu)
    guards = kv_bank.Guards()
    for sigma in (1.0, 2.0, 3.0):
        assert store.commit("s", guards, sigma, {k: dict(v) for k, v in step.items()})
    store.end_run(token)
    placed = [store._steps[("s", sigma)].on_compute for sigma in (1.0, 2.0, 3.0)]
    assert placed == [True, True, False] and store.compute_bytes == 2 * nbytes
    store.begin_run(10 * nbytes, room=nbytes, offload_device=cpu)
    assert [store._steps[("s", s)].on_compute for s in (1.0, 2.0, 3.0)] == [False, True, False]
    assert store.compute_bytes == nbytes and store.nbytes == 3 * nbytes
    needed = {("output", 9, 0): ("k", "v")}
    for sigma in (1.0, 2.0, 3.0):
        held = store.lookup("s", sigma, needed).tensors[("output", 9, 0)]
        assert torch.equal(held["k"], step[("output", 9, 0)]["k"])
    assert store.lookup("s", 1.0, {("output", 9, 0): ("q", "k", "v")}) is None  # no queries held


# -------------------------------------------------------------------- across prompts

def _options_snapshot(model):
    to = model.model_options.get("transformer_options", {})
    return (model.patches_uuid, sorted(model.patches), sorted(model.object_patches), sorted(to),
            {k: sorted(v) for k, v in to.get("wrappers", {}).items()})


def test_a_b_a_is_identical_and_the_given_model_untouched(kit, bank):
    """A (cold), A (warm), B (another reference and prompt), A again: the two warm A runs are
    identical; the models given to the nodes are unchanged."""
    before = _options_snapshot(kit["model"])
    model_a = indetail(kit["model"], kit["reference"])
    a_before = _options_snapshot(model_a)
    a1, _ = run(kit, model_a)
    a2, _ = run(kit, model_a)
    run(kit, indetail(kit["model"], kit["other"]), positive=encode(kit["clip"], "a boat"))
    a3, rows = run(kit, model_a)
    assert rows == [2] * STEPS and torch.equal(a2, a3)
    assert_warm_equals(a3, a1)
    assert _options_snapshot(kit["model"]) == before and _options_snapshot(model_a) == a_before


# ---------------------------------------------------------------------------- the node

def test_the_node_sets_the_budget_or_switches_the_bank_off(kit, bank):
    model = indetail(kit["model"], kit["reference"])
    before = _options_snapshot(model)
    out = QKVReferenceKVBank.execute(model, True, 64)
    on = out.args[0]
    assert _options_snapshot(model) == before and on is not model
    assert "on: budget 64 MiB (the Reference K/V Bank node)" in out.ui["text"][0]
    run(kit, on)
    assert bank.budget == 64 * kv_bank.MB and bank.stats().steps == STEPS
    status = QKVReferenceKVBank.execute(model, True, 0).ui["text"][0]
    assert "budget 256 MiB ($QKV_KV_BANK_MB)" in status and f"in {STEPS} step(s) of 1 stream(s)" in status
    off = QKVReferenceKVBank.execute(model, False, 0).args[0]
    bank.clear()
    for _ in range(2):
        _, rows = run(kit, off)
        assert rows == [3] * STEPS and bank.stats().steps == 0


def test_bad_budgets_are_refused_with_a_message(kit, bank, monkeypatch):
    assert QKVReferenceKVBank.validate_inputs(budget_mb=-1).startswith("QKV Reference K/V Bank: expected budget_mb")
    with pytest.raises(ValueError, match="QKV Reference K/V Bank: expected budget_mb"):
        QKVReferenceKVBank.execute(kit["model"], True, -5)
    monkeypatch.setenv(kv_bank.ENV_BUDGET, "lots")
    with pytest.raises(ValueError, match=r"expected QKV_KV_BANK_MB to be a size in MiB >= 0 or 'auto', got 'lots'"):
        run(kit, indetail(kit["model"], kit["reference"]))


# ------------------------------------------------------------------------- step sizes

def _full_size_layers(config):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from qkv_control.families.unet import UNetFamily

    unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return UNetFamily().discover_layers(unet)


SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def test_step_sizes_of_sd15_and_sdxl_at_native_size():
    """Bytes of one InDetail-IP step (the decoder's self-attention K/V, fp16) from the real
    structures on the meta device: SD1.5 at 64x64 latents 27.5 MB (3 layers each at 64², 32², 16²
    of 320, 640, 1280 channels), SDXL at 128x128 220.2 MB (6 layers at 64² x 640, 30 at 32² x 1280)."""
    from qkv_control.attention.layers import select_layers
    from qkv_control.tiny.full_size import SD15_UNET_CONFIG

    sd15 = select_layers("output", _full_size_layers(SD15_UNET_CONFIG), "attn1")
    assert len(sd15) == 9
    assert kv_bank.step_bytes(sd15, (64, 64), 2) == 2 * 2 * 3 * (4096 * 320 + 1024 * 640 + 256 * 1280) == 27_525_120
    sdxl = select_layers("output", _full_size_layers(SDXL_UNET_CONFIG), "attn1")
    assert len(sdxl) == 36
    assert kv_bank.step_bytes(sdxl, (128, 128), 2) == 2 * 2 * (6 * 4096 * 640 + 30 * 1024 * 1280) == 220_200_960


def test_step_size_formula_matches_what_a_run_stores(kit, bank):
    """The formula's bytes are what a tiny run's steps hold (fp32)."""
    from qkv_control.attention.layers import select_layers
    from qkv_control.patching.layers import discover_layers

    run(kit, indetail(kit["model"], kit["reference"]))
    layers = select_layers("output", discover_layers(kit["model"]), "attn1")
    assert bank.stats().nbytes == STEPS * kv_bank.step_bytes(layers, (SIZE, SIZE), 4)


# ---------------------------------------------------------------------------- DiTs
# Tiny DiTs (tests/dit_helpers.py) at a 16² latent, Euler, "simple" schedule. A stream row's image-token
# K/V on a joint-attention model depend on its own text (and pooled ``y``, Flux's ``guidance``: the
# inversion's for InDetail-IP, the branch's for MCA-Ctrl), the text length it is padded to in the call,
# RoPE positions (latent size, Kontext reference latents), the sigma: each is in the key.

DIT_STEPS = 3
# Flux.1 dev / schnell: distilled, cfg 1 (one row per image); the others run CFG (two)
DIT_CFG = {"flux": 1.0, "flux_schnell": 1.0, "sd35": 3.0, "chroma": 3.0, "flux2": 3.0}
DIT_PLAIN_ROWS = {"flux": 1, "flux_schnell": 1, "sd35": 2, "chroma": 2, "flux2": 2}  # rows per image per step
DIT_SUBJECT_MASK = _box(32, 32, 64, 64)
DIT_REGION_MASK = _box(48, 16, 64, 80)
LONG_PROMPT = " ".join(["a red fox in the snow"] * 25)  # over 77 CLIP tokens: SD3.5's text is 154 long


@pytest.fixture(scope="module", params=["flux", "sd35"])
def dit(request):
    return _dit(request.param)


@functools.lru_cache(maxsize=None)
def _dit(family):
    from dit_helpers import LATENT_CHANNELS, dit_kit
    from qkv_control.tiny.dit import TEXT_WIDTH, cached_dit_checkpoint

    model, positive, negative = dit_kit(family)
    if family in ("flux", "flux_schnell", "sd35"):
        clip = cached_dit_checkpoint(family)[1]
        prompt = functools.partial(encode, clip)
    else:  # seeded random contexts of the model's text width (dit_helpers.dit_kit)
        def prompt(text):
            generator = torch.Generator().manual_seed(len(text))
            return [[torch.randn(1, 12, TEXT_WIDTH, generator=generator), {"pooled_output": None}]]

    def invert(seed, text=positive, negative_text=None, size=SIZE):
        latent = torch.randn(1, LATENT_CHANNELS[family], size, size, generator=torch.Generator().manual_seed(seed))
        return QKVDDIMInversion.execute(model, {"samples": latent}, DIT_STEPS, "simple", text,
                                        negative_text).args[0]

    return {"family": family, "model": model, "positive": positive, "negative": negative, "prompt": prompt,
            "other": prompt("a blue boat on a calm lake"), "reference": invert(2), "invert": invert}


def dit_run(d, model, positive=None, negative=None, **options):
    """(final latent, rows per model call) of one KSampler run of a tiny DiT."""
    from dit_helpers import ModelRows, dit_sample

    options = {"steps": DIT_STEPS, "cfg": DIT_CFG[d["family"]], **options}
    with ModelRows(d["model"]) as counter:
        out = dit_sample(model, positive or d["positive"], negative or d["negative"], d["family"], **options)
    return out, counter.rows


def dit_indetail(d, inversion=None, schedule=DEFAULT_SCHEDULE, policy=None):
    patched = QKVInDetailReferenceAttention.execute(d["model"], inversion or d["reference"], "auto", schedule,
                                                    0.5, 0.5).args[0]
    return patched if policy is None else QKVImagePromptGuidance.execute(patched, policy).args[0]


def with_extra(conditioning, **extra):
    return [[c, {**options, **extra}] for c, options in conditioning]


def assert_entries_compact(bank):
    """Every tensor the bank holds owns just its bytes: a copy, never a view that keeps a model
    call's whole q/k/v (every row and token) alive behind a few rows' image tokens."""
    held = [t for entry in bank._steps.values() for fields in entry.tensors.values() for t in fields.values()]
    assert held and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in held)


def assert_warm_changes_plain(d, warm, **options):
    """The reference acts: the warm result is far from plain sampling (the equalities mean something)."""
    plain, _ = dit_run(d, d["model"], **options)
    assert float((warm - plain).abs().max()) > 100 * WARM_RTOL * float(plain.abs().max())


@pytest.mark.parametrize("family,schedule,batch", [
    *((family, schedule, 1) for family in ("flux", "sd35")
      for schedule in (DEFAULT_SCHEDULE, "concat:0-1", "replace:0-1", "stratified:0-1")),
    ("flux", DEFAULT_SCHEDULE, 2), ("sd35", DEFAULT_SCHEDULE, 2),
    ("flux_schnell", DEFAULT_SCHEDULE, 1), ("chroma", DEFAULT_SCHEDULE, 1), ("flux2", DEFAULT_SCHEDULE, 1)])
def test_dit_indetail_warm_run_appends_no_stream_row(bank, family, schedule, batch):
    """InDetail-IP on every DiT family and mode, N = 1 and 2 (conflict-free: the reference row only in
    positive calls): the cold run appends the reference row (plain + 1 rows per step) and equals a run
    without the bank exactly; a warm run with a new seed and a new prompt of the generated image appends
    no row (plain sampling's count: Flux cfg 1 N, SD3.5 CFG 2N) and equals that run without the bank."""
    d = _dit(family)
    model = dit_indetail(d, schedule=schedule)
    plain_rows = DIT_PLAIN_ROWS[family] * batch
    cold, rows = dit_run(d, model, batch=batch)
    assert rows == [plain_rows + 1] * DIT_STEPS and bank.stats().steps == DIT_STEPS
    assert_entries_compact(bank)
    assert torch.equal(cold, dit_run(d, without_bank(model), batch=batch)[0])
    warm, rows = dit_run(d, model, positive=d["other"], seed=1, batch=batch)
    assert rows == [plain_rows] * DIT_STEPS
    expected, _ = dit_run(d, without_bank(model), positive=d["other"], seed=1, batch=batch)
    assert_warm_equals(warm, expected)
    assert_warm_changes_plain(d, warm, positive=d["other"], seed=1, batch=batch)


def test_dit_indetail_both_branches_with_a_negative_text_is_warm(bank):
    """SD3.5 under ``both`` with the inversion's negative text: the positive and the negative-branch
    reference rows (2 + 2 rows cold), none warm (2), equal to the run without the bank."""
    d = _dit("sd35")
    model = dit_indetail(d, d["invert"](2, negative_text=d["prompt"]("blurry")), policy="both")
    _, rows = dit_run(d, model)
    assert rows == [4] * DIT_STEPS
    warm, rows = dit_run(d, model, positive=d["other"], seed=1)
    assert rows == [2] * DIT_STEPS
    assert_warm_equals(warm, dit_run(d, without_bank(model), positive=d["other"], seed=1)[0])


def test_dit_partial_hits_run_the_row_at_the_missing_sigmas(dit, bank):
    """A cold run of 3 steps, then 6 steps: the sigmas the 3-step schedule holds are warm (plain rows),
    the others run the reference row; equal to the 6-step run without the bank."""
    import comfy.samplers

    d = dit
    model = dit_indetail(d)
    dit_run(d, model)
    sampling = d["model"].get_model_object("model_sampling")
    held = comfy.samplers.calculate_sigmas(sampling, "simple", DIT_STEPS)[:-1].tolist()
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 2 * DIT_STEPS)[:-1].tolist()
    plain = DIT_PLAIN_ROWS[d["family"]]
    expected_rows = [plain if any(abs(s - h) <= 1e-6 for h in held) else plain + 1 for s in sigmas]
    assert plain in expected_rows and plain + 1 in expected_rows
    warm, rows = dit_run(d, model, steps=2 * DIT_STEPS, seed=1)
    assert rows == expected_rows
    assert_warm_equals(warm, dit_run(d, without_bank(model), steps=2 * DIT_STEPS, seed=1)[0])


def _kontext(seed):
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


# (family, what changes between the first and the second run): each second run misses at every step
DIT_KEY_PARTS = {
    "latent size": ("flux", {}, {"size": 24}),
    "inversion prompt (the stream's text)": ("flux", {}, {"reference": "other prompt"}),
    "the inversion's guidance (the stream's guidance)": ("flux", {}, {"reference": "guidance 8"}),
    "Kontext reference latent": ("flux", {"positive": ("reference_latents", 5)},
                                 {"positive": ("reference_latents", 6)}),
    "the generated prompt's length (the stream's padding)": ("sd35", {}, {"positive": "long"}),
    "SD3.5 latent size": ("sd35", {}, {"size": 24}),
}


def _dit_case(d, change):
    """(model, run options) of one side of a key-part case."""
    options = {}
    reference = d["reference"]
    if change.get("reference") == "other prompt":
        reference = d["invert"](2, text=d["other"])
    elif change.get("reference") == "guidance 8":
        reference = d["invert"](2, text=with_extra(d["positive"], guidance=8.0))
    if "size" in change:
        options["size"] = change["size"]
    positive = change.get("positive")
    if positive == "long":
        options["positive"] = d["prompt"](LONG_PROMPT)
    elif positive is not None:
        name, seed = positive
        options["positive"] = with_extra(d["positive"], **{name: [_kontext(seed)]})
    return dit_indetail(d, reference), options


@pytest.mark.parametrize("part", list(DIT_KEY_PARTS))
def test_dit_key_parts_miss_when_changed(bank, part):
    """Each part of a DiT stream row's key, changed alone, misses at every step (the reference row runs:
    the rows of a run without the bank); run again it is warm (plain sampling's rows) and equal to the
    run without the bank. (SD3.5's 154-token prompt and 77-token negative run in separate calls.)"""
    family, first, second = DIT_KEY_PARTS[part]
    d = _dit(family)
    model, options = _dit_case(d, first)
    _, rows = dit_run(d, model, **options)
    assert rows == [DIT_PLAIN_ROWS[family] + 1] * DIT_STEPS
    model, options = _dit_case(d, second)
    expected, cold_rows = dit_run(d, without_bank(model), seed=1, **options)
    _, plain_rows = dit_run(d, d["model"], seed=1, **options)
    assert sum(cold_rows) == sum(plain_rows) + DIT_STEPS
    _, rows = dit_run(d, model, seed=1, **options)
    assert rows == cold_rows, f"{part}: expected a miss at every step"
    warm, rows = dit_run(d, model, seed=1, **options)
    assert rows == plain_rows
    assert_warm_equals(warm, expected)


def test_dit_indetail_reference_keeps_the_inversions_guidance(bank):
    """Flux dev: the reference row carries the guidance its inversion ran with (captured per-row input),
    so the sampler's guidance is not part of the reference's key: a warm run at another guidance hits
    and equals the run without the bank (which would differ if the row took the sampler's guidance)."""
    d = _dit("flux")
    model = dit_indetail(d)
    dit_run(d, model)
    positive = with_extra(d["positive"], guidance=8.0)
    warm, rows = dit_run(d, model, positive=positive, seed=1)
    assert rows == [1] * DIT_STEPS
    assert_warm_equals(warm, dit_run(d, without_bank(model), positive=positive, seed=1)[0])
    assert "guidance" in d["reference"].conds


def test_dit_a_stream_padded_by_another_row_is_not_stored(bank):
    """SD3.5 under ``both`` with a 154-token negative text: the negative-branch reference row pads
    the call's text to 154, the positive reference (77 tokens, keyed at 77) runs padded further than
    its key says, so it is not stored and runs again warm (3 rows); the negative one is warm."""
    d = _dit("sd35")
    model = dit_indetail(d, d["invert"](2, negative_text=d["prompt"](LONG_PROMPT)), policy="both")
    _, rows = dit_run(d, model)
    assert rows == [4] * DIT_STEPS and bank.stats().steps == DIT_STEPS
    warm, rows = dit_run(d, model, seed=1)
    assert rows == [3] * DIT_STEPS
    assert_warm_equals(warm, dit_run(d, without_bank(model), seed=1)[0])


def test_dit_a_b_a_is_identical_and_the_given_model_untouched(bank):
    """Flux: A (cold), B (another reference and prompt, cold), A again (warm): equal to A's cold run;
    the models given to the nodes are unchanged."""
    d = _dit("flux")
    before = _options_snapshot(d["model"])
    model_a = dit_indetail(d)
    a_before = _options_snapshot(model_a)
    a1, _ = dit_run(d, model_a)
    _, rows = dit_run(d, dit_indetail(d, d["invert"](3)), positive=d["other"])
    assert rows == [2] * DIT_STEPS
    a3, rows = dit_run(d, model_a)
    assert rows == [1] * DIT_STEPS
    assert_warm_equals(a3, a1)
    assert _options_snapshot(d["model"]) == before and _options_snapshot(model_a) == a_before


# ------------------------------------------------------------------ DiTs: MCA-Ctrl

def dit_mca(d, policy=None, generation=False):
    subject, scene = d["reference"], d["invert"](6)
    streams = Streams(subject) if generation else Streams(subject, scene)
    control = MCACtrl(streams, Masks(DIT_SUBJECT_MASK, DIT_REGION_MASK), Schedule(mca.PhaseSchedule(0.5, 1.0)))
    model = add_control(d["model"], control)
    return model if policy is None else QKVImagePromptGuidance.execute(model, policy).args[0]


@pytest.mark.parametrize("family,policy,generation,cold", [
    ("flux", None, False, 3), ("flux", None, True, 2),
    ("sd35", None, False, 6), ("sd35", "positive_only", False, 4), ("sd35", None, True, 4)])
def test_dit_mca_warm_run_appends_no_stream_row(bank, family, policy, generation, cold):
    """MCA-Ctrl on a DiT, SAGI (step 0: the streams' queries and own text keys from the bank) and SALQ:
    the cold run's stream rows per controlled branch, none warm at a new seed (plain sampling's rows),
    equal to the run without the bank."""
    d = _dit(family)
    model = dit_mca(d, policy, generation)
    _, rows = dit_run(d, model)
    assert rows == [cold] * DIT_STEPS
    assert_entries_compact(bank)
    warm, rows = dit_run(d, model, seed=1)
    assert rows == [DIT_PLAIN_ROWS[family]] * DIT_STEPS
    assert_warm_equals(warm, dit_run(d, without_bank(model), seed=1)[0])
    assert_warm_changes_plain(d, warm, seed=1)


@pytest.mark.parametrize("family,change,rows_after", [
    ("flux", "prompt", 3), ("flux", "guidance", 3), ("sd35", "prompt", 4), ("sd35", "pooled y", 4)])
def test_dit_mca_streams_follow_the_branch_text(bank, family, change, rows_after):
    """MCA-Ctrl's streams run with their CFG branch's text, guidance (Flux dev) and pooled ``y`` (SD3.5)
    included: a new prompt, guidance or pooled vector alone misses that branch's streams (SD3.5 official: the negative
    branch stays warm, 2 + 2 rows), and the result equals the run without the bank."""
    d = _dit(family)
    model = dit_mca(d)
    dit_run(d, model)
    positive = {"prompt": d["other"], "guidance": with_extra(d["positive"], guidance=8.0),
                "pooled y": [[c, {**o, "pooled_output": o["pooled_output"] * 2}] for c, o in d["positive"]],
                }[change]
    _, rows = dit_run(d, model, positive=positive, seed=1)
    assert rows == [rows_after] * DIT_STEPS
    warm, rows = dit_run(d, model, positive=positive, seed=2)
    assert rows == [DIT_PLAIN_ROWS[family]] * DIT_STEPS
    assert_warm_equals(warm, dit_run(d, without_bank(model), positive=positive, seed=2)[0])


def test_dit_bank_line_reports_the_streams(bank, caplog):
    """The run's line on a DiT counts the steps from the bank (no 'off')."""
    d = _dit("sd35")
    model = dit_indetail(d)
    with caplog.at_level("INFO", logger="qkv_control"):
        dit_run(d, model)
        dit_run(d, model, seed=1)
    assert f"InDetail-IP reference: {DIT_STEPS} of {DIT_STEPS} step(s) from the bank, 0 computed" in caplog.text
    assert "bank off" not in caplog.text
