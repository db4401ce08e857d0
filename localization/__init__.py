"""Subject localization: text prompt -> boxes (Grounding DINO) -> masks (SAM), and SAM with point/box prompts.

Pure torch/transformers, no ComfyUI: checkpoint reading (`checkpoint_io`), key converters from the
original checkpoint layouts to transformers' models (`grounding_dino_convert`, `sam_convert`), where BERT's
files are found (`bert_files`), loading (`loading`), the official libraries' preprocessing (`images`),
Grounding DINO's ``predict()`` (`detection`), ``SamPredictor`` (`segmentation`), ComfyUI's box and point
conventions (`prompts`) and the batch pipelines (`pipeline`). The ComfyUI model-management glue lives in
`localization.managed`.
"""
