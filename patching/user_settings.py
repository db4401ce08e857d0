"""ComfyUI's user settings as the server holds them: ``comfy.settings.json`` in the user's folder,
written by the frontend (and ``POST /settings/<id>``) through ``app/app_settings.py``.

Read on the server when a run needs a setting, so a setting applies to prompts queued through the
HTTP API with no browser open too. A queued prompt does not say which user queued it, so this reads
the ``default`` user's file (ComfyUI's only user unless it runs with ``--multi-user``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

logger = logging.getLogger("qkv_control")

SETTINGS_FILE = "comfy.settings.json"  # the name app/app_settings.py gives it
DEFAULT_USER = "default"


def settings_path(user: str = DEFAULT_USER) -> Optional[str]:
    """The user's settings file, as ComfyUI's user manager places it (None: no such user folder)."""
    import folder_paths

    root = folder_paths.get_public_user_directory(user)
    return None if root is None else os.path.join(root, SETTINGS_FILE)


def read_setting(setting_id: str, user: str = DEFAULT_USER) -> Any:
    """The stored value of ``setting_id``, None where it is not set (no file, no entry, ``null``).
    A file that is not a JSON object logs a warning and counts as no settings, as ComfyUI does."""
    path = settings_path(user)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as error:
        logger.warning("QKV Control: ComfyUI's settings file %s could not be read (%s); setting '%s' ignored",
                       path, error, setting_id)
        return None
    if not isinstance(settings, dict):
        logger.warning("QKV Control: ComfyUI's settings file %s is not a JSON object; setting '%s' ignored",
                       path, setting_id)
        return None
    return settings.get(setting_id)
