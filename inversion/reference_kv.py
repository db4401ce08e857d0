"""Where an inverted stream's reference K/V come from during one run (design note 5): this call's
stream rows, the K/V bank (``kv_bank``), or not available yet.

A control that reads a stream makes one ``ReferenceKV`` per stream row kind in ``start_run``
and asks it two things:

- ``needs_row(call, text)`` in ``extra_rows``: whether this model call must run the stream's row.
  No, when this step's entry is held (from the bank, or recorded by an earlier call at the same
  sigma: cond and uncond in separate calls); yes otherwise (a miss: the row computes it).
- ``take(call, rows, q, k, v)`` in ``attend``: the stream's ``StreamQKV`` for this layer and sigma,
  from the call's own ``rows`` (then recorded: once every (layer, field) the step needs is there,
  the step is committed to the bank whole) or from the held entry (moved to the call's device),
  else None.

What a step needs is the control's ``needs(sigma)``: ``{layer key: fields}`` (``FIELDS_KV``, or
``FIELDS_QKV`` where the stream's queries are read, as MCA-Ctrl's SAGI does; on a DiT SAGI also
reads the stream's own text keys, ``FIELDS_CONTEXT``). A bank entry serves a later run when it holds
all of them. On a DiT's joint attention an entry holds the stream's image tokens only (after the
model's q/k norms and RoPE), plus its text and Kontext tokens where ``FIELDS_CONTEXT`` are needed.

The bank key of a stream row at a call (``BankSession.key_for``), everything that changes what
the row computes:

1. the sampling model: its base model, weight patches (LoRA: ``patches_uuid`` and the patched
   keys), object patches and every other node's callable in the sampler's model options
   (``fingerprint.model_fingerprint``), its compute dtype and device;
2. what the pack does to extra rows: ControlNet residuals (``branch_rows.EXTRA_ROW_CONTROLNET``)
   and every registered control that changes stream rows (``AttentionControl.changes_stream_rows``);
3. the stream: the inversion's content key (``InversionResult.key``: image latent, schedule,
   clean level, inversion prompt, the inversion model's patches), the row's role, and its text
   (context and per-row inputs: the inversion prompt, or MCA-Ctrl's CFG branch text; on a DiT
   these include the pooled ``y``, Flux's ``guidance`` and Kontext's ``ref_latents``);
4. the call: the latent size the stream is fitted to (on a DiT also its RoPE positions), every
   per-row input the row borrows from the sampler rows (``branch_rows.borrowed_inputs``: an
   inpainting model's ``c_concat``, Kontext reference latents the inversion did not have), the
   inputs every row shares (``branch_rows.shared_inputs``: Kontext's ``ref_latents_method``) and,
   on a DiT, the text length the row runs at (``BankSession.text_tokens``: its text is zero-padded
   to the call's; a step another extra row padded further is not stored);
5. the sigma (exact), per step entry; and the (layer, field)s read, as the entry's coverage.

The bank is off for a run whose model has hook patches (weights that change with the step), for
a stream whose inversion has no content key, and where the Reference K/V Bank node says so.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from ..attention.rows import ROLE_COND, ROLE_UNCOND, take_rows
from ..patching.branch_rows import EXTRA_ROW_CONTROLNET, borrowed_inputs, shared_inputs
from . import kv_bank
from .fingerprint import Guards, model_fingerprint, text_fingerprint

logger = logging.getLogger("qkv_control")

FIELDS_KV = ("k", "v")
FIELDS_QKV = ("q", "k", "v")
# On a DiT, the row's own non-image tokens' keys/values (its text, without the zero padding of the
# batch it ran in, then Kontext's reference-latent tokens): MCA-Ctrl's SAGI attends them.
FIELDS_CONTEXT = ("k_context", "v_context")
# Compute-device memory the bank leaves free at a run's start beyond what the run's models need,
# as a share of the device's total memory: room for what follows the run (the VAE decode).
DEVICE_RESERVE_SHARE = 0.2
# Two sigmas within this relative distance are the same step of the run.
_SAME_SIGMA = 1e-6


def _same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= _SAME_SIGMA * max(1.0, abs(b))


@dataclass(frozen=True)
class StreamQKV:
    """A stream's attention inputs at one layer: [rows of the stream, tokens, heads·dim] each;
    ``q`` only where the step needs the stream's queries. ``rows``: the call's rows they were
    taken from; empty when held (the bank, or an earlier call at the same sigma)."""

    q: Optional[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    rows: tuple[int, ...] = ()
    k_context: Optional[torch.Tensor] = None   # FIELDS_CONTEXT, where the step needs them
    v_context: Optional[torch.Tensor] = None


@dataclass
class _Step:
    sigma: float
    key: Optional[tuple]           # the bank key of this step's row; None: the bank is not used
    needed: Mapping                # layer key -> fields
    tensors: dict = field(default_factory=dict)
    complete: bool = False
    record: bool = True            # keep what the rows produce (for the bank, or a later call)
    text_tokens: Optional[int] = None  # DiTs: the call's text length the key assumes (padding)


def _whole_step(layout) -> bool:
    """The call holds both CFG branches: no later call at its sigma can need what it computed."""
    return layout.has(ROLE_COND) and layout.has(ROLE_UNCOND)


class ReferenceKV:
    """One stream row kind's K/V during one run (see the module docstring)."""

    def __init__(self, run, stream, needs: Callable[[float], Mapping], label: Optional[str] = None):
        self.session: BankSession = run.service(BankSession)
        self.session.sources.append(self)
        self.stream = stream
        self.needs = needs
        self.label = label or stream.label
        self._own_text: Optional[str] = None
        self._step: Optional[_Step] = None
        self.hits = 0        # steps served by the bank
        self.misses = 0      # steps whose row ran
        self.stored = 0      # of those, steps the bank took

    def text_key(self, text) -> str:
        if text is None:
            if self._own_text is None:
                inversion = self.stream.inversion
                self._own_text = text_fingerprint(inversion.context, dict(inversion.conds))
            return self._own_text
        return text_fingerprint(*text)

    def needs_row(self, call, text=None) -> bool:
        """Whether ``call`` must run this stream's row. ``text``: (context, per-row conds) the row
        runs with, when not the inversion's own (MCA-Ctrl's branch text)."""
        sigma = call.sigma_value
        key = self.session.key_for(self, call, text)
        step = self._step
        if step is not None and step.complete and step.key == key and _same_sigma(step.sigma, sigma):
            return False
        needed = self.needs(sigma)
        entry = self.session.lookup(key, sigma, needed)
        if entry is not None:
            self._step = _Step(sigma, key, needed, entry.tensors, complete=True)
            self.hits += 1
            return False
        # Without the bank, kept only for a later call at this sigma that reads it: cond and uncond in
        # separate calls, the negative branch seeing the image prompt (on a 1024 px Flux, 24 MB per
        # layer per tensor otherwise).
        later = not _whole_step(call.layout) and not call.run.policy.positive_only
        self._step = _Step(sigma, key, needed, record=key is not None or later,
                           text_tokens=self.session.text_tokens(call, text, self) if key is not None else None)
        self.misses += 1
        return True

    def take(self, call, rows: list[int], q, k, v) -> Optional[StreamQKV]:
        """This layer's stream inputs at the call's sigma: from ``rows`` of this call (recorded),
        else from the step's held entry, else None. On a DiT's joint attention, the rows' image
        tokens only (after the model's q/k norms and RoPE, at the target's positions), and their
        non-image tokens where the step needs ``FIELDS_CONTEXT``."""
        step = self._step
        layer = call.layer.key
        current = step is not None and _same_sigma(step.sigma, call.sigma_value)
        if rows:
            # Held past this call (the bank, a later call at this sigma): compact copies, never views
            # that would keep the whole call's q/k/v alive. Used in this call only: views.
            held = current and step.record and not step.complete and layer in step.needed

            def of_rows(t):
                part = call.image_part(take_rows(t, rows))
                return part.clone(memory_format=torch.contiguous_format) if held else part

            taken = {"k": of_rows(k), "v": of_rows(v)}
            wanted = step.needed.get(layer, ()) if current else ()
            if "q" in wanted:
                taken["q"] = of_rows(q)
            if "k_context" in wanted:
                taken["k_context"], taken["v_context"] = own_context(call, rows, k, v)
            if current and step.key is not None and call.joint and call.tokens.n_text != step.text_tokens:
                # Another row of the call padded the text further than the key says: not for the bank.
                step.key = None
            if held:
                step.tensors[layer] = taken
                if step.tensors.keys() >= step.needed.keys():
                    step.complete = True
                    if step.key is not None and self.session.commit(step.key, step.sigma, step.tensors):
                        self.stored += 1
            return StreamQKV(taken.get("q"), taken["k"], taken["v"], tuple(rows),
                             taken.get("k_context"), taken.get("v_context"))
        if not (current and step.complete) or layer not in step.tensors:
            return None
        held = step.tensors[layer]
        device = k.device

        def moved(name):
            return held[name].to(device, non_blocking=True) if name in held else None

        return StreamQKV(moved("q"), moved("k"), moved("v"), (), moved("k_context"), moved("v_context"))

    def drop(self) -> None:
        self._step = None


def own_context(call, rows: list[int], k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows``' (one text each, rows of one stream) non-image keys and values of a DiT's joint
    attention without the zero padding of the call's text: [rows, own text + reference tokens, C]."""
    k_rows, v_rows, keep = call.non_image_keys(rows, k, v)
    if keep is None:  # compact copies (held by the bank), never views of the call's k/v
        return k_rows.clone(memory_format=torch.contiguous_format), v_rows.clone(memory_format=torch.contiguous_format)
    return k_rows[:, keep[0]], v_rows[:, keep[0]]


class BankSession:
    """One run's use of the bank (``run.service(BankSession)``): its settings, the sampling model's
    part of every key, the counts it logs once when the run ends."""

    def __init__(self, run):
        model = run.model_patcher
        self.settings = kv_bank.settings_of(run.model_options)
        self.dit = run.family.uses_override  # attention through the DiT route (joint sequences)
        budget = kv_bank.budget_bytes(self.settings)
        self.off_reason = None
        if not self.settings.enabled:
            self.off_reason = "switched off by the Reference K/V Bank node"
        elif budget <= 0:
            self.off_reason = "its budget is 0"
        elif getattr(model, "hook_patches", None):
            self.off_reason = "the model has hook patches (weights that change during the run)"
        self.guards = Guards([model.model])
        changing = ",".join(c.name for c in run.controls if c.changes_stream_rows)
        manual_cast = getattr(model.model, "manual_cast_dtype", None)
        parts = (str(id(model.model)), model_fingerprint(model, self.guards, run.model_options),
                 f"dtype={model.model_dtype()},{manual_cast}", f"device={model.load_device}",
                 f"controlnet={EXTRA_ROW_CONTROLNET}", f"controls={changing}")
        self.model_key = hashlib.sha256("|".join(parts).encode()).hexdigest()
        self.sources: list[ReferenceKV] = []
        room, offload = _device_room(run)
        self.token = kv_bank.BANK.begin_run(budget, room, offload, run.clock.sigmas.tolist())

    @property
    def enabled(self) -> bool:
        return self.off_reason is None

    def key_for(self, source: ReferenceKV, call, text) -> Optional[tuple]:
        inversion = source.stream.inversion
        if not self.enabled or not inversion.key:
            return None
        conds = dict(inversion.conds) if text is None else text[1]
        borrowed = borrowed_inputs(call.c_concat, call.conds, call.layout, call.x.shape[0], conds)
        shared = shared_inputs(call.conds, call.x.shape[0], conds)
        return (self.model_key, inversion.key, source.stream.role, source.text_key(text),
                tuple(call.x.shape[-2:]), str(call.x.device), text_fingerprint(None, borrowed) if borrowed else "",
                text_fingerprint(None, shared) if shared else "", self.text_tokens(call, text, source))

    def text_tokens(self, call, text, source: ReferenceKV) -> Optional[int]:
        """DiTs: the text length the row runs at, the longer of the sampler rows' and its own (its
        text is zero-padded to the call's; the padding is masked, yet a longer sequence rounds
        otherwise). None on UNets (their text is a cross-attention's, repeated by ComfyUI)."""
        if not self.dit:
            return None
        own = source.stream.inversion.context if text is None else text[0]
        lengths = [t.shape[1] for t in (call.context, own) if t is not None]
        return max(lengths) if lengths else 0

    def lookup(self, key, sigma: float, needed) -> Optional[kv_bank.StepEntry]:
        if key is None or not needed:
            return None
        return kv_bank.BANK.lookup(key, float(sigma), needed)

    def commit(self, key, sigma: float, tensors: dict) -> bool:
        return kv_bank.BANK.commit(key, self.guards, float(sigma), tensors, self.token)

    def report(self) -> str:
        """One line: each stream's steps from the bank / computed / stored, and the bank's size."""
        used = [s for s in self.sources if s.hits or s.misses]
        if not self.enabled:
            return f"off ({self.off_reason}): the streams ran as rows"
        streams = "; ".join(f"{s.label}: {s.hits} of {s.hits + s.misses} step(s) from the bank, "
                            f"{s.misses} computed, {s.stored} stored" for s in used)
        return f"{streams}; bank {kv_bank.BANK.stats().describe()}"

    def close(self) -> None:
        try:
            if any(s.hits or s.misses for s in self.sources) or not self.enabled:
                text = self.report()
                logger.info("QKV Control: reference K/V bank %s", text)
                send_status(self.settings.node_id, text)
        finally:
            for source in self.sources:
                source.drop()
            kv_bank.BANK.end_run(self.token)


def _device_room(run) -> tuple[Optional[int], Optional[torch.device]]:
    """(bytes the bank may keep on the compute device, the offload device) at the run's start,
    before ComfyUI loads the run's models: the device's free memory, plus what the bank holds
    there, minus what this run's models still need to load and run, ComfyUI's minimum inference
    memory and ``DEVICE_RESERVE_SHARE`` of the device; 0 where ComfyUI's memory manager does not
    track the bank's device bytes (``bank_residency.track``). (None, None) where the compute device
    is the offload device (CPU, ``--gpu-only``)."""
    import comfy.model_management as mm

    model = run.model_patcher
    device, offload = model.load_device, model.offload_device
    if not separate_offload_device(device, offload):
        return None, None
    try:
        needed = 0
        for patcher in [model, *getattr(model, "get_nested_additional_models", lambda: [])()]:
            needed += patcher.model_size() - patcher.loaded_size()
        if run.latent_image is not None:
            shape = list(run.latent_image.shape)
            needed += model.model.memory_required([shape[0] * 2] + shape[1:])
        room = (mm.get_free_memory(device) + kv_bank.BANK.compute_bytes - needed - mm.minimum_inference_memory()
                - DEVICE_RESERVE_SHARE * mm.get_total_memory(device))
    except Exception:  # noqa: BLE001 - an estimate that fails keeps the bank off the device
        logger.debug("QKV Control: K/V bank room estimate failed", exc_info=True)
        room = 0
    from .bank_residency import track

    # Device entries only while ComfyUI's memory manager can ask for them back.
    if room > 0 and not track(device, offload):
        room = 0
    return max(0, int(room)), offload


def separate_offload_device(device, offload) -> bool:
    """Whether entries can leave the compute device for another (not CPU, not ``--gpu-only``)."""
    return device != offload and torch.device(device).type != "cpu"


def send_status(node_id: Optional[str], text: str) -> None:
    """The run's bank line as the Reference K/V Bank node's progress text in the frontend."""
    if node_id is None:
        return
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is not None:
        try:
            send(f"K/V bank: {text}", node_id)
        except Exception:  # noqa: BLE001 - a status message never fails a run
            logger.debug("QKV Control: K/V bank status not sent", exc_info=True)
