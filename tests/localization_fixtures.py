"""Fixtures of the localization tests (``pytest_plugins = ["localization_fixtures"]`` in a test module): the
tiny ORIGINAL-format Grounding DINO, BERT and SAM files, and the two models loaded from them by the real
loader code, once per module."""

from __future__ import annotations

import pytest

from qkv_control.localization import loading
from qkv_control.tiny.localization_files import write_tiny_localization_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{"grounding_dino", "bert_dir", "sam"}``: paths of the tiny files (released names)."""
    return write_tiny_localization_files(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def gdino(files):
    return loading.load_grounding_dino(files["grounding_dino"])


@pytest.fixture(scope="module")
def sam(files):
    return loading.load_sam(files["sam"])
