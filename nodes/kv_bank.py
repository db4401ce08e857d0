"""Reference K/V Bank node: whether runs of a model reuse inverted streams' attention inputs across
runs, the bank's budget, and what the bank holds (``inversion.kv_bank``)."""

from __future__ import annotations

from comfy_api.latest import io

from ..inversion import kv_bank
from ..inversion.reference_kv import send_status
from ..patching import keys
from ..patching.patch import set_transformer_option

NAME = "QKV Reference K/V Bank"
MAX_BUDGET_MB = 1 << 20  # 1 TiB


def status_text(settings: kv_bank.BankSettings) -> str:
    """What the node shows: on/off, the budget in force and where it comes from, what the bank holds."""
    if not settings.enabled:
        return f"off for this model; the bank holds {kv_bank.BANK.stats().describe()}"
    budget, source = kv_bank.budget_in_force(settings)
    stats = kv_bank.BANK.stats()
    state = "on" if budget > 0 else "off (budget 0)"
    return (f"{state}: budget {budget / kv_bank.MB:.0f} MiB ({source}); holds {stats.nbytes / kv_bank.MB:.1f} MiB "
            f"in {stats.steps} step(s) of {stats.streams} stream(s)")


class QKVReferenceKVBank(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QKVReferenceKVBank",
            display_name=NAME,
            category="QKV Control/inversion",
            description="The reference K/V bank: InDetail-IP's reference and MCA-Ctrl's subject and scene streams are "
                        "plain passes of the model over an inverted image, the same for every seed and prompt, so "
                        "their self-attention keys/values are kept per layer and step; a run after the first with the "
                        "same reference, model and sampler steps appends no stream row (the cost of plain sampling). "
                        "The bank is on without this node; use it to switch it off for a model or to set its memory "
                        "budget. Shows the bank's state here after every run.",
            search_aliases=["kv bank", "kv cache", "reference cache", "reuse reference", "bank", "indetail",
                            "mca-ctrl", "speed"],
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with (after InDetail-IP / MCA-Ctrl, or before)."),
                io.Boolean.Input("enabled", default=True,
                                 tooltip="On: runs of this model read the bank and fill it. Off: the streams run as "
                                         "rows at every step, as without a bank (what the bank holds is kept)."),
                io.Int.Input("budget_mb", default=0, min=0, max=MAX_BUDGET_MB, step=64,
                             tooltip="The bank's memory budget in MiB (the whole bank, wherever it lies: GPU while "
                                     "there is room, else the offload device); the least recently used steps are "
                                     "evicted beyond it. Non-zero: this budget. 0: ComfyUI's setting "
                                     f"({kv_bank.SETTING_BUDGET_NAME}) if set, else ${kv_bank.ENV_BUDGET} if set, "
                                     "else a quarter of the RAM available. The text below says which is in "
                                     "force. A step costs about 28 MB for SD1.5 (InDetail-IP, 512 px, "
                                     "fp16), 220 MB for SDXL (1024 px); see docs/kv_bank.md."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the bank's settings (a clone; the input is unchanged).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, budget_mb=0, enabled=True, **kwargs):
        if not 0 <= budget_mb <= MAX_BUDGET_MB:
            return f"{NAME}: expected budget_mb in 0-{MAX_BUDGET_MB} (0 = automatic), got {budget_mb}"
        return True

    @classmethod
    def execute(cls, model, enabled=True, budget_mb=0) -> io.NodeOutput:
        if not 0 <= int(budget_mb) <= MAX_BUDGET_MB:
            raise ValueError(f"{NAME}: expected budget_mb in 0-{MAX_BUDGET_MB} (0 = automatic), got {budget_mb}")
        node_id = getattr(cls.hidden, "unique_id", None) if getattr(cls, "hidden", None) is not None else None
        settings = kv_bank.BankSettings(enabled=bool(enabled), budget_mb=float(budget_mb) if budget_mb else None,
                                        node_id=None if node_id is None else str(node_id))
        text = status_text(settings)
        send_status(settings.node_id, text)
        return io.NodeOutput(set_transformer_option(model, keys.KV_BANK, settings), ui={"text": [text]})


NODES = [QKVReferenceKVBank]
