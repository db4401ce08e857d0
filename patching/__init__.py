"""ComfyUI wiring shared by every control: layer discovery, the attention router,
branch rows and run-scoped state. The math it routes to lives in ``attention/``."""
