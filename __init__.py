"""QKV Control: training-free image prompting by attention control for ComfyUI."""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    # Imported here so the pure modules (attention/, inversion math) stay importable
    # without ComfyUI, e.g. by their own tests.
    from .nodes.registry import QKVControlExtension

    return QKVControlExtension()
