"""The IP-Adapter family: weight files, image projections (linear and Resampler), and
the attention controls that feed image tokens into cross-attention (decoupled, joint,
DEADiff layer routing) plus the e-commerce condition and mask guidance.

``files.py`` and ``projection.py`` are plain torch; ``control.py`` and
``guidance.py`` are the ComfyUI glue built on ``patching/``."""
