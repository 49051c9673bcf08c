"""Fixtures: tiny models written by dalle2-pytorch's own trainers, in each real format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from tests.http_server import FakeServer  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Config paths of the same tiny architecture saved in three layouts."""
    root = tmp_path_factory.mktemp("models")
    return {
        "tracker": write_tiny_model(root / "tracker", layout="tracker", seed=0),
        "checkpoint": write_tiny_model(root / "checkpoint", layout="checkpoint", seed=1),
        "bare": write_tiny_model(root / "bare", layout="bare", seed=2),
        "single": write_tiny_model(root / "single", layout="tracker", split_decoder=False, seed=3),
    }


@pytest.fixture(scope="session")
def tiny_config(tiny_models) -> Path:
    return tiny_models["tracker"]


@pytest.fixture(scope="session")
def reranking_config(tiny_config) -> Path:
    """The tiny models with the config asking text to image for the best of 3 by default."""
    data = json.loads(tiny_config.read_text())
    data["clip"]["default_rerank"] = 3
    path = tiny_config.with_name("reranking.json")  # beside it: its model paths are relative
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (tests/http_server.py)."""
    served = FakeServer()
    yield served
    served.close()


@pytest.fixture
def fast_retries(monkeypatch):
    """Downloads that retry at once, and online."""
    monkeypatch.setenv("DALLE2_DOWNLOAD_BACKOFF", "0.01")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
