"""Shared pytest fixtures: the pack loaded as a package, and tiny models (session-cached)."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from fixtures import tiny_models
from fixtures.pack import load_pack

# CI reruns the same examples every time (a failure there reproduces); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


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
