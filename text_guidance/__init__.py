"""The e-commerce paper's text guidance (Li 2024, "style-consistent e-commerce image
generation", §3.2): condition guidance (``condition.py``), mask guidance (``mask.py``), and
the capture of word cross-attention maps (``attention_map.py``), as attention controls on
the cross-attention layers. The math is in ``attention/cross_attention.py``."""
