"""Launch a real ComfyUI ``main.py`` as a child process and stop it again by its PID.

Used by the test suite's server fixture, ``make demo`` and ``make serve``. A launched
server gets its own base / output / temp / user / input directories, so it never writes
into the ComfyUI tree, and the pack is linked into the base directory's ``custom_nodes``
(with ``--base-directory`` ComfyUI looks for custom nodes only there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_LINK_NAME = "qkv_control"
TINY_MODELS_ENV = "QKV_CONTROL_TINY_MODELS"

# Model folders ComfyUI knows; created empty so the server's folder lists resolve.
MODEL_FOLDERS = (
    "checkpoints", "clip", "clip_vision", "controlnet", "diffusion_models", "embeddings",
    "ipadapter", "loras", "sams", "grounding-dino", "text_encoders", "unet", "upscale_models", "vae",
)


# A picked port another process took before the server bound it ("Port N is already in use",
# or the bind error "Address already in use"): the server starts again on another port.
PORT_TAKEN = "already in use"
PORT_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def runtime_dir() -> Path:
    return Path(os.environ.get("QKV_RUNTIME", PACK_ROOT / ".runtime"))


# Which provisioned tree to use: "default" (the one `make setup` provisions, or $COMFYUI_PATH) or
# "oldest" (the oldest supported ComfyUI, provisioned by `make test` for the suite's second pass).
COMFYUI_CHOICE_ENV = "QKV_COMFYUI"
TREE_MARKERS = {"default": "comfyui_path", "oldest": "comfyui_oldest_path"}


def comfyui_path() -> Path:
    """The ComfyUI tree: the oldest supported one when ``$QKV_COMFYUI=oldest``, else
    ``$COMFYUI_PATH``, else the one ``scripts/setup.sh`` recorded."""
    choice = os.environ.get(COMFYUI_CHOICE_ENV, "").strip() or "default"
    if choice not in TREE_MARKERS:
        raise RuntimeError(f"{COMFYUI_CHOICE_ENV}={choice!r}: expected one of {', '.join(TREE_MARKERS)}")
    if choice == "default" and os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    marker = runtime_dir() / TREE_MARKERS[choice]
    if not marker.exists():
        setup = "make test" if choice == "oldest" else "make setup"
        raise RuntimeError(f"ComfyUI runtime missing ({marker} not found): run `{setup}` first")
    return Path(marker.read_text().strip())


def link_pack(custom_nodes_dir: Path) -> Path:
    """Make ``custom_nodes_dir/qkv_control`` point at this pack (idempotent)."""
    custom_nodes_dir.mkdir(parents=True, exist_ok=True)
    link = custom_nodes_dir / PACK_LINK_NAME
    if link.is_symlink() and link.resolve() == PACK_ROOT:
        return link
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise RuntimeError(f"{link} exists and is not a link to {PACK_ROOT}")
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    return link


def make_base_directory(base: Path, inputs: list[Path] = ()) -> Path:
    """Lay out a ComfyUI base directory: models/<folder>, input/, custom_nodes/qkv_control.

    ``inputs`` (files) are copied into ``input/``. Returns the models directory.
    """
    models = base / "models"
    for name in MODEL_FOLDERS:
        (models / name).mkdir(parents=True, exist_ok=True)
    (base / "input").mkdir(parents=True, exist_ok=True)
    for src in inputs:
        if src.is_file():
            shutil.copy2(src, base / "input" / src.name)
    link_pack(base / "custom_nodes")
    return models


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launching process dies (Linux), so a killed
    test run or demo leaves no server behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ComfyServer:
    """A ``main.py`` child process. ``start()`` blocks until ``/system_stats`` answers.

    ``base_directory=None`` runs on the ComfyUI tree's own models and custom nodes
    (``make serve``, the demo with real models); the output/temp/user/input
    directories are still separate when given.
    """

    comfyui: Path
    python: str = sys.executable
    host: str = "127.0.0.1"
    port: int = 0
    base_directory: Path | None = None
    output_directory: Path | None = None
    temp_directory: Path | None = None
    user_directory: Path | None = None
    input_directory: Path | None = None
    cpu: bool = True
    tiny_models: bool = False
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    die_with_parent: bool = True
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.python, str(self.comfyui / "main.py"), "--listen", self.host, "--port", str(self.port),
               "--disable-auto-launch", "--use-pytorch-cross-attention"]
        if self.cpu:
            cmd.append("--cpu")
        for flag, path in (("--base-directory", self.base_directory), ("--output-directory", self.output_directory),
                           ("--temp-directory", self.temp_directory), ("--user-directory", self.user_directory),
                           ("--input-directory", self.input_directory)):
            if path is not None:
                Path(path).mkdir(parents=True, exist_ok=True)
                cmd += [flag, str(Path(path).resolve())]
        if self.user_directory is not None:
            # ComfyUI's default database lives in the tree's user/ folder, whatever --user-directory says.
            cmd += ["--database-url", f"sqlite:///{Path(self.user_directory).resolve() / 'comfyui.db'}"]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        picked = self.port == 0
        for attempt in range(PORT_ATTEMPTS if picked else 1):
            if picked:
                self.port = free_port(self.host)
            self._launch()
            try:
                self.wait_ready(timeout)
                return self
            except BaseException:
                self.stop()
                # Between picking the port and binding it another process took it: pick again.
                if not (picked and attempt + 1 < PORT_ATTEMPTS and PORT_TAKEN in self.log_text().lower()):
                    raise
        return self

    def _launch(self) -> None:
        env = dict(os.environ)
        env.pop(TINY_MODELS_ENV, None)
        if self.tiny_models:
            env[TINY_MODELS_ENV] = "1"
        env.update(self.env)
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            # Own session: stopping the server never signals the caller's process group.
            self.process = subprocess.Popen(self.command(), cwd=self.comfyui, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent if self.die_with_parent else None)
        finally:
            if self.log_path:
                log.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} before it was ready"
                                   f"{self._log_tail()}")
            try:
                response = requests.get(f"{self.url}/system_stats", timeout=2)
                # The port was free when picked; another process may have taken it since: answer
                # only to our own server (its argv holds the command we ran).
                if response.ok and self._is_ours(response.json()):
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI at {self.url} not ready after {timeout:.0f} s{self._log_tail()}")

    def _is_ours(self, stats: dict) -> bool:
        argv = (stats.get("system") or {}).get("argv")
        return not isinstance(argv, list) or argv[1:] == self.command()[2:]

    def _log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        tail = Path(self.log_path).read_text(errors="replace").splitlines()[-lines:]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail)

    def log_text(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path and Path(self.log_path).exists() else ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server's PID, SIGKILL it after ``grace`` seconds."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)

    def __enter__(self) -> "ComfyServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
