"""MCA-Ctrl (Multi-party Collaborative Attention Control) wired into ComfyUI.

``control.py`` is the AttentionControl that appends the subject (and scene) stream rows and
runs SALQ / SAGI in the target's self-attention, as the official code does; ``config.py``
groups its configuration. The math is in ``attention/mca_ctrl.py``, the nodes in
``nodes/mca_ctrl_nodes.py``.
"""
