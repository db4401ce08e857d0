"""`make serve`: ComfyUI with the pack, for interactive use.

Runs the provisioned (or ``$COMFYUI_PATH``) ComfyUI's ``main.py`` in the foreground on
its own models, custom nodes and user folders, with the pack linked into custom_nodes
by ``make setup``. Real models only: the tiny test loaders are not registered unless
``--tiny`` is given; then the server uses .runtime/tiny-base (tiny model files, the
workflow inputs) as its base directory instead of the ComfyUI tree's.

    python scripts/serve.py [--port 8188] [--listen 127.0.0.1] [--tiny] [-- extra main.py args]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

import _runtime  # noqa: F401  (sys.path for the pack)
from _runtime import ROOT, comfyui_path, has_accelerator, import_comfy_for_tiny_models, pack_links

from client.server import TINY_MODELS_ENV, ComfyServer, make_base_directory

logger = logging.getLogger("qkv_control.serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--listen", default="127.0.0.1", help="address to listen on (0.0.0.0 for the network)")
    parser.add_argument("--tiny", action="store_true",
                        help="register the tiny random-weight loader nodes and serve tiny model files")
    parser.add_argument("--cpu", action="store_true", help="force CPU (default: CPU only when torch sees no GPU)")
    parser.add_argument("extra", nargs="*", help="further main.py arguments, after --")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    comfy = comfyui_path()
    server = ComfyServer(comfyui=comfy, python=sys.executable, host=args.listen, port=args.port,
                         cpu=args.cpu or not has_accelerator(), extra_args=list(args.extra))
    if args.tiny:
        base = ROOT / ".runtime" / "tiny-base"
        models = make_base_directory(base)
        inputs = ROOT / "workflows" / "inputs"
        if inputs.is_dir():
            for path in inputs.iterdir():
                if path.is_file():
                    shutil.copy2(path, base / "input" / path.name)
        import_comfy_for_tiny_models(cpu=server.cpu)
        from qkv_control.tiny.model_files import write_all

        write_all(models)
        server.base_directory = base
    else:
        links = pack_links(comfy / "custom_nodes")
        if not links:
            logger.error("the pack is not linked into %s: run `make setup`", comfy / "custom_nodes")
            return 2
        if len(links) > 1:
            logger.warning("the pack is linked into custom_nodes more than once (%s): it loads twice",
                           ", ".join(p.name for p in links))
    env = dict(os.environ)
    env.pop(TINY_MODELS_ENV, None)
    if args.tiny:
        env[TINY_MODELS_ENV] = "1"
    command = server.command()
    logger.info("ComfyUI with QKV Control on http://%s:%d (Ctrl-C stops it)", args.listen, args.port)
    os.chdir(comfy)
    # Replace this process: Ctrl-C and signals go straight to ComfyUI.
    os.execve(command[0], command, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
