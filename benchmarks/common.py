"""Shared benchmark plumbing: in-process ComfyUI on the available device, timing and peak memory.

Every benchmark prints ratios measured in one run (patched / plain), never
pass/fail thresholds: speed goals are read, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = Path(os.environ.get("QKV_RUNTIME", ROOT / ".runtime"))


def bootstrap() -> None:
    """Make ComfyUI and the pack importable; SDPA attention; CPU unless a GPU is present."""
    comfy = os.environ.get("COMFYUI_PATH") or (RUNTIME / "comfyui_path").read_text().strip()
    for path in (str(RUNTIME / "import"), comfy):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True
    if not torch.cuda.is_available():
        args.cpu = True
        torch.set_num_threads(max(1, (os.cpu_count() or 2)))


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on GPU, sampled RSS growth on CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self._process = psutil.Process()
            self.base = self._process.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
        return False


def argument_parser(description: str, *, full_size: bool = True, repeats: int = 3,
                    full_size_help: str = "also measure a random full-size SD1.5 (writes a ~1.7 GB temp file; "
                                          "slow on CPU)") -> argparse.ArgumentParser:
    """The options every benchmark has: the full-size run (on or off) and repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=full_size,
                        help=full_size_help)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def measure(fn, repeats: int = 3):
    """(best seconds, peak bytes) of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    best, peak = float("inf"), 0
    for _ in range(repeats):
        with PeakMemory() as memory:
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
        best = min(best, elapsed)
        peak = max(peak, memory.peak)
    return best, peak


def memory_columns(plain_bytes: int, patched_bytes: int) -> dict:
    """Peak memory columns; the ratio only where the plain peak is large enough to mean anything
    (on CPU, RSS growth of a tiny model is allocator noise)."""
    mb = 1024 * 1024
    ratio = f"{patched_bytes / plain_bytes:.3f}" if plain_bytes > 16 * mb else "n/a (<16 MB)"
    return {"peak MB plain": f"{plain_bytes / mb:.1f}", "peak MB patched": f"{patched_bytes / mb:.1f}",
            "memory ratio": ratio}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")  # noqa: T201 - a benchmark's output is its report
    if not rows:
        return
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))  # noqa: T201
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))  # noqa: T201


def mca_masks(size):
    """MCA-Ctrl's subject mask and target region for a ``size``-latent image (pixel masks)."""
    import torch

    subject = torch.zeros(1, size * 8, size * 8)
    subject[:, size * 2:size * 6, size * 2:size * 6] = 1
    region = torch.zeros(1, size * 8, size * 8)
    region[:, size * 3:size * 7, size:size * 5] = 1
    return subject, region


@contextlib.contextmanager
def random_full_size_sd15():
    """A random full-size SD1.5 UNet (ModelPatcher) written to a temp file (~1.7 GB) and loaded
    through the real CheckpointLoaderSimple, so benchmarks see the real block structure."""
    import folder_paths
    import nodes as comfy_nodes

    from qkv_control.tiny.full_size import write_random_sd15_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        write_random_sd15_checkpoint(Path(folder) / "random-sd15.safetensors")
        folder_paths.add_model_folder_path("checkpoints", folder, is_default=True)
        yield comfy_nodes.CheckpointLoaderSimple().load_checkpoint("random-sd15.safetensors")[0]
