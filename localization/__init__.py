"""Subject localization: text prompt -> boxes (Grounding DINO) -> masks (SAM).

Pure torch/transformers, no ComfyUI: checkpoint reading (`checkpoint_io`), key converters from the
original checkpoint layouts to transformers' models (`grounding_dino_convert`, `sam_convert`), loading
(`loading`), and the detection + segmentation pipeline (`pipeline`). The ComfyUI model-management glue
lives in `localization.managed`.
"""
