"""MCA-Ctrl (Multi-party Collaborative Attention Control) wired into ComfyUI.

``control.py`` is the AttentionControl that appends the subject and condition
streams and runs SALQ / SAGI in the target's self-attention; ``streams.py``
holds the condition stream generated from text. The math is in
``attention/mca_ctrl.py``, the nodes in ``nodes/mca_ctrl_nodes.py``.
"""
