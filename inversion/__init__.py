"""DDIM inversion and the inverted-latent chain.

``chain.py`` and ``ddim.py`` are pure torch (no ComfyUI import); ``invert.py``
runs a ComfyUI model, ``result.py`` holds what a node passes on
(IO type ``QKV_INVERSION``), ``stream.py`` turns a result into extra batch rows.
"""
