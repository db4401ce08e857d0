"""Names of the pack's entries in ``transformer_options``: configuration only, or
run-scoped objects placed there for the length of one sampling run."""

# tuple of AttentionControl, configuration only (tuples survive ComfyUI's
# model_options copies unchanged, so clones never share a list)
CONTROLS = "qkv_control.controls"
# RunState of the current sampling run (set by the OUTER_SAMPLE wrapper)
RUN = "qkv_control.run"
# RowLayout of the current UNet call (set by the APPLY_MODEL wrapper)
ROWS = "qkv_control.rows"
# image-prompt guidance policy chosen by the conflict-free guidance node
IMAGE_PROMPT_POLICY = "qkv_control.image_prompt_policy"
# key under which the pack's wrappers are registered
WRAPPER = "qkv_control"
# inversion.kv_bank.BankSettings chosen by the Reference K/V Bank node (configuration only)
KV_BANK = "qkv_control.kv_bank"
