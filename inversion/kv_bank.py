"""The reference K/V bank: what an inverted stream's row produces in attention, per (layer, sigma),
kept across sampling runs (design: "The reference K/V bank").

An inverted stream (InDetail-IP's reference, MCA-Ctrl's subject and scene) is a plain pass of the
model over the inverted latent at the call's sigma: its per-layer keys/values depend on the image,
the model and its patches, the stream's text, the latent size and the sigma, never on the seed, the
generated image's prompt or the batch item. The bank keeps them, so a later run with the same
reference appends no stream row where every (layer, sigma) it needs is held.

This module is the store: step entries keyed by (stream key, sigma) (the key is built by
``reference_kv.BankSession``), each holding ``{layer key: {field: tensor}}`` (``k``, ``v``, and
``q`` where a reader needs the stream's queries) in the dtype they were computed in.

- **Budget** (bytes, over wherever entries lie; ``budget_in_force``): the Reference K/V Bank node's
  ``budget_mb``, else ComfyUI's setting ``SETTING_BUDGET`` (read from the settings file when a run
  starts), else ``$QKV_KV_BANK_MB``, else a quarter of the RAM available when the bank is first used.
- **LRU eviction** over step entries, sparing what a running run needs: entries a running run has
  used or stored, and a committing stream's own steps at sigmas of its run's schedule (its later
  steps). When the budget is still short a new step is not admitted, so a run whose steps exceed
  the budget keeps its first steps warm run after run rather than evicting them in turn.
- **Where entries lie**: on the compute device while the room there allows (``make_room``, set
  when a run starts, before ComfyUI loads the run's models), else on the model's offload device;
  a step read from there is moved to the compute device layer by layer, when a layer reads it.
  ComfyUI's free-memory requests reach the device entries through ``bank_residency``
  (``give_back``: moved to the offload device, least recently used first).
- **Commit only complete steps** (``commit`` takes a whole step): an interrupted run leaves
  nothing half filled.
- **Stale entries**: a stream's guards (``fingerprint.Guards``: the model and the patch objects
  its key names by ``id``) are checked on every lookup; a dead guard drops the stream's entries.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Optional

from ..patching.user_settings import read_setting
from .fingerprint import Guards

logger = logging.getLogger("qkv_control")

ENV_BUDGET = "QKV_KV_BANK_MB"
# The frontend's settings entry (web/js/kv_bank_setting.js), stored in the user's comfy.settings.json.
SETTING_BUDGET = "QKVControl.KVBank.BudgetMB"
SETTING_BUDGET_NAME = "Settings > QKV Control > Reference K/V bank budget (MiB)"
# The automatic budget: this share of the RAM available when the bank is first used (the offload
# device, where the bank's entries end up when the compute device is short).
AUTOMATIC_RAM_SHARE = 0.25
MB = 1024 * 1024

_automatic_bytes: Optional[int] = None
_warned_setting: Optional[str] = None  # the bad setting value last warned about (once per value)


@dataclass(frozen=True)
class BankSettings:
    """What the Reference K/V Bank node sets on a model (configuration only).

    enabled:   whether runs of this model read and fill the bank
    budget_mb: the bank's byte budget in MiB; None: ComfyUI's setting, ``$QKV_KV_BANK_MB`` or the automatic one
    node_id:   the node that set them (the run's status text goes there)
    """

    enabled: bool = True
    budget_mb: Optional[float] = None
    node_id: Optional[str] = None


def settings_of(model_options: dict) -> BankSettings:
    from ..patching import keys

    settings = model_options.get("transformer_options", {}).get(keys.KV_BANK)
    return settings if isinstance(settings, BankSettings) else BankSettings()


def parse_budget_mb(text: str, what: str = ENV_BUDGET) -> Optional[float]:
    """A budget in MiB from text: a number >= 0, or '' / 'auto' for the automatic budget (None)."""
    value = str(text).strip().lower()
    if value in ("", "auto"):
        return None
    try:
        mb = float(value)
    except ValueError:
        mb = float("nan")
    if not math.isfinite(mb) or mb < 0:
        raise ValueError(f"QKV Control: expected {what} to be a size in MiB >= 0 or 'auto', got '{text}'")
    return mb


def automatic_budget_bytes() -> int:
    """A quarter of the RAM available at the first call (kept: the bank's own growth must not
    shrink its budget)."""
    global _automatic_bytes
    if _automatic_bytes is None:
        import psutil

        _automatic_bytes = int(AUTOMATIC_RAM_SHARE * psutil.virtual_memory().available)
    return _automatic_bytes


def setting_budget_mb() -> Optional[float]:
    """The budget in MiB from ComfyUI's settings (``SETTING_BUDGET``), None where it is not set or
    0. A bad value logs a warning naming the setting (once per value) and counts as not set."""
    global _warned_setting
    value = read_setting(SETTING_BUDGET)
    if value is None:
        return None
    what = f"the ComfyUI setting '{SETTING_BUDGET}' ({SETTING_BUDGET_NAME})"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"QKV Control: expected {what} to be a size in MiB >= 0, got {value!r}")
        mb = parse_budget_mb(str(value), what)
    except ValueError as error:
        if _warned_setting != repr(value):
            _warned_setting = repr(value)
            logger.warning("%s; ignored: the budget comes from $%s or the automatic one", error, ENV_BUDGET)
        return None
    _warned_setting = None
    return mb or None


def budget_in_force(settings: BankSettings) -> tuple[int, str]:
    """(bytes, where they come from) of the budget for a run: the node's, else ComfyUI's setting,
    else the environment's, else the automatic one."""
    if settings.budget_mb is not None:
        return int(settings.budget_mb * MB), "the Reference K/V Bank node"
    mb = setting_budget_mb()
    if mb is not None:
        return int(mb * MB), f"ComfyUI setting {SETTING_BUDGET_NAME}"
    mb = parse_budget_mb(os.environ.get(ENV_BUDGET, ""))
    if mb is not None:
        return int(mb * MB), f"${ENV_BUDGET}"
    return automatic_budget_bytes(), "automatic: a quarter of the RAM available"


def budget_bytes(settings: BankSettings) -> int:
    return budget_in_force(settings)[0]


def step_bytes(layers, latent_hw: tuple[int, int], element_size: int, fields: int = 2, rows: int = 1) -> int:
    """Bytes of one step entry: ``fields`` tensors (k, v: 2; with q: 3) of [rows, tokens, heads·dim]
    per layer, tokens = the latent's grid halved ``layer.level`` times (a UNet's stride-2 downsampling)."""
    total = 0
    for layer in layers:
        h, w = latent_hw
        for _ in range(layer.level):
            h, w = (h + 1) // 2, (w + 1) // 2
        total += fields * rows * h * w * layer.heads * layer.dim_head * element_size
    return total


def _nbytes(tensors: Mapping) -> int:
    return sum(t.numel() * t.element_size() for fields in tensors.values() for t in fields.values())


@dataclass
class StepEntry:
    """One stream's attention inputs at one sigma: ``tensors[layer key][field]``."""

    tensors: dict
    nbytes: int
    on_compute: bool
    tick: int

    def covers(self, needed: Mapping) -> bool:
        """Whether every (layer, fields) of ``needed`` is held."""
        return all(layer in self.tensors and set(fields) <= self.tensors[layer].keys()
                   for layer, fields in needed.items())


@dataclass(frozen=True)
class BankStats:
    steps: int
    streams: int
    nbytes: int
    compute_bytes: int
    budget: int

    def describe(self) -> str:
        where = f", {self.compute_bytes / MB:.1f} MiB of it on the compute device" if self.compute_bytes else ""
        return (f"{self.nbytes / MB:.1f} MiB in {self.steps} step(s) of {self.streams} stream(s){where}, "
                f"budget {self.budget / MB:.0f} MiB")


class KVBank:
    """The process's bank (``BANK``). Thread-safe; every method is O(entries) at worst."""

    def __init__(self):
        self._lock = threading.RLock()
        self._steps: "OrderedDict[tuple, StepEntry]" = OrderedDict()  # (stream key, sigma), LRU first
        self._streams: dict = {}  # stream key -> [Guards, number of steps held]
        self.nbytes = 0
        self.compute_bytes = 0
        self.budget = 0
        self._tick = 0
        self._runs: dict[int, tuple[int, frozenset]] = {}  # run token -> (tick at its start, its sigmas)
        self._next_token = 0
        self._room: Optional[int] = None  # compute-device bytes allowed; None: no separate offload device
        self._offload = None

    # ---------------------------------------------------------------- runs
    def begin_run(self, budget: int, room: Optional[int], offload_device=None, sigmas=()) -> int:
        """A run with schedule ``sigmas`` starts (before its models load): set the budget (evicting
        down to it) and the compute-device room (moving entries beyond it to ``offload_device``).
        Returns its token."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self.set_budget(budget)
            self.make_room(room, offload_device)
            self._runs[token] = (self._tick, frozenset(float(s) for s in sigmas))
            return token

    def end_run(self, token: int) -> None:
        with self._lock:
            self._runs.pop(token, None)

    def _spared(self, step_key, entry: StepEntry, stream_key, schedule: frozenset) -> bool:
        """Used or stored by a run still going, or a step of the committing stream at a sigma of
        its run's schedule: not evicted for it."""
        if self._runs and entry.tick > min(start for start, _ in self._runs.values()):
            return True
        return step_key[0] == stream_key and step_key[1] in schedule

    def _touch(self, step_key, entry: StepEntry) -> None:
        self._tick += 1
        entry.tick = self._tick
        self._steps.move_to_end(step_key)

    # -------------------------------------------------------------- lookup
    def lookup(self, stream_key, sigma: float, needed: Mapping) -> Optional[StepEntry]:
        """The step entry of ``stream_key`` at ``sigma`` holding all of ``needed``, or None."""
        with self._lock:
            stream = self._streams.get(stream_key)
            if stream is None:
                return None
            if not stream[0].alive():
                self._drop_stream(stream_key)
                return None
            entry = self._steps.get((stream_key, sigma))
            if entry is None or not entry.covers(needed):
                return None
            self._touch((stream_key, sigma), entry)
            return entry

    def holds(self, stream_key, sigma: float) -> bool:
        with self._lock:
            return (stream_key, sigma) in self._steps

    # -------------------------------------------------------------- commit
    def commit(self, stream_key, guards: Guards, sigma: float, tensors: dict, token: Optional[int] = None) -> bool:
        """Store a complete step (``tensors[layer][field]``, on the compute device) for the run
        ``token``. False when it does not fit the budget even after evicting what is not spared."""
        nbytes = _nbytes(tensors)
        with self._lock:
            old = self._steps.get((stream_key, sigma))
            if old is not None:
                self._remove((stream_key, sigma))
            schedule = self._runs.get(token, (0, frozenset()))[1]
            if not self._evict(nbytes, stream_key, schedule):
                return False
            on_compute = self._room is None or self.compute_bytes + nbytes <= self._room
            if not on_compute:
                tensors = _moved(tensors, self._offload)
            entry = StepEntry(dict(tensors), nbytes, on_compute, 0)
            self._steps[(stream_key, sigma)] = entry
            self._touch((stream_key, sigma), entry)
            stream = self._streams.setdefault(stream_key, [guards, 0])
            stream[0] = guards
            stream[1] += 1
            self.nbytes += nbytes
            self.compute_bytes += nbytes if on_compute and self._room is not None else 0
            return True

    # ------------------------------------------------------------ eviction
    def _evict(self, incoming: int, stream_key=None, schedule: frozenset = frozenset()) -> bool:
        """Evict least recently used entries that are not spared until ``incoming`` bytes fit."""
        if self.nbytes + incoming > self.budget:
            for step_key, entry in list(self._steps.items()):
                if not self._spared(step_key, entry, stream_key, schedule):
                    self._remove(step_key)
                    if self.nbytes + incoming <= self.budget:
                        break
        return self.nbytes + incoming <= self.budget

    def _remove(self, step_key) -> None:
        entry = self._steps.pop(step_key)
        self.nbytes -= entry.nbytes
        if entry.on_compute and self._room is not None:
            self.compute_bytes -= entry.nbytes
        stream = self._streams.get(step_key[0])
        if stream is not None:
            stream[1] -= 1
            if stream[1] <= 0:
                del self._streams[step_key[0]]

    def _drop_stream(self, stream_key) -> None:
        for step_key in [k for k in self._steps if k[0] == stream_key]:
            self._remove(step_key)
        self._streams.pop(stream_key, None)

    def set_budget(self, budget: int) -> None:
        with self._lock:
            self.budget = max(0, int(budget))
            self._evict(0)

    def make_room(self, room: Optional[int], offload_device=None) -> int:
        """Allow at most ``room`` bytes on the compute device (None: the compute device is the
        offload device); entries beyond it move to ``offload_device``, least recently used first.
        Returns the bytes moved."""
        with self._lock:
            self._offload = offload_device
            if room is None or offload_device is None:
                self._room = None
                self.compute_bytes = 0
                return 0
            if self._room is None:  # entries so far counted as on the (one) device
                self.compute_bytes = sum(e.nbytes for e in self._steps.values() if e.on_compute)
            self._room = max(0, int(room))
            return self._move_off(self.compute_bytes - self._room)

    def give_back(self, nbytes: Optional[int]) -> int:
        """ComfyUI's memory manager asks for ``nbytes`` of the compute device (None: all of it,
        ``bank_residency``): move the least recently used device entries to the offload device
        until that much is freed, and keep the room there for the rest of the run. Returns the bytes
        moved."""
        with self._lock:
            if self._room is None:
                return 0
            moved = self._move_off(self.compute_bytes if nbytes is None else nbytes)
            self._room = self.compute_bytes
            return moved

    def _move_off(self, nbytes: float) -> int:
        """Move device entries, least recently used first, to the offload device until ``nbytes``."""
        moved = 0
        for entry in list(self._steps.values()):
            if moved >= nbytes:
                break
            if entry.on_compute:
                entry.tensors = _moved(entry.tensors, self._offload)
                entry.on_compute = False
                self.compute_bytes -= entry.nbytes
                moved += entry.nbytes
        return moved

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._streams.clear()
            self.nbytes = self.compute_bytes = 0

    def stats(self) -> BankStats:
        with self._lock:
            for stream_key in [k for k, (guards, _) in self._streams.items() if not guards.alive()]:
                self._drop_stream(stream_key)
            return BankStats(len(self._steps), len(self._streams), self.nbytes, self.compute_bytes, self.budget)


def _moved(tensors: dict, device) -> dict:
    return {layer: {name: t.to(device) for name, t in fields.items()} for layer, fields in tensors.items()}


BANK = KVBank()
