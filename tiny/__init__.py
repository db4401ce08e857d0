"""Tiny random-weight models built with ComfyUI's own classes, for tests and `make demo`'s tiny mode."""
