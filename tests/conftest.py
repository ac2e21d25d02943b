"""Shared pytest fixtures: the pack loaded as a package, and tiny models (session-cached)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from fixtures import tiny_models

ROOT = Path(__file__).resolve().parent.parent

# CI reruns the same examples every time (a failure there reproduces); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def load_pack(name: str = "xmgie_pack"):
    """Import the repository as a package (as ComfyUI does) so nodes/ relative imports resolve."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_unet():
    return tiny_models.tiny_unet()


@pytest.fixture(scope="session")
def tiny_vae():
    return tiny_models.tiny_vae()


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    return tiny_models.clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def tiny_clip_text():
    return tiny_models.tiny_clip_text()


@pytest.fixture(scope="session")
def tiny_clip_vision():
    return tiny_models.tiny_clip_vision()


@pytest.fixture(scope="session")
def tiny_t5():
    return tiny_models.tiny_t5_encoder()
