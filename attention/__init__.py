"""Pure torch attention math: modes, masks, schedules, the batch-row layout.

Nothing in this package imports ComfyUI, so it is tested on its own. The
ComfyUI glue that feeds it lives in ``patching/``.
"""
