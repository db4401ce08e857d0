"""QKV Control: training-free image prompting by attention control for ComfyUI."""

# Served at /extensions/qkv_control/: the frontend loads every web/js/*.js and fetches a
# node's help page from /extensions/qkv_control/docs/<NodeId>.md (web/docs/).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported here so the pure modules (attention/, inversion math) stay importable
    # without ComfyUI, e.g. by their own tests.
    from .nodes.registry import QKVControlExtension

    return QKVControlExtension()
