"""Talking to a ComfyUI server from outside: launch it, convert workflows, queue prompts.

Pure Python (``requests``, optional ``websocket-client``); nothing here imports ComfyUI,
so the test suite, ``make demo`` and the batch CLI share it.
"""
