"""QKV Control: training-free image prompting by attention control for ComfyUI."""

# Served at /extensions/qkv_control/: the frontend loads every web/js/*.js and fetches a
# node's help page from /extensions/qkv_control/docs/<NodeId>.md (web/docs/).
WEB_DIRECTORY = "./web"


def _log_without_v3_node_api() -> None:
    """A ComfyUI older than the V3 node API never calls comfy_entrypoint: say why the nodes are missing."""
    import importlib.util
    import logging

    try:
        if importlib.util.find_spec("comfy") is None or importlib.util.find_spec("comfy_api.latest") is not None:
            return
    except ImportError:  # comfy_api itself missing
        pass
    from .patching.comfy_hooks import SUPPORTED_COMFYUI

    logging.getLogger("qkv_control").error(
        "QKV Control: this ComfyUI has no V3 node API (comfy_api.latest), so the pack's nodes cannot "
        "register. QKV Control supports ComfyUI %s: update ComfyUI.", SUPPORTED_COMFYUI)


_log_without_v3_node_api()


async def comfy_entrypoint():
    # Imported here so the pure modules (attention/, inversion math) stay importable
    # without ComfyUI, e.g. by their own tests.
    from .nodes.registry import QKVControlExtension

    return QKVControlExtension()
