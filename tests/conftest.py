"""Shared fixtures: a small long-tailed demo set and a small model config."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests never write to the user's cache: demo sets and embeddings go to a temporary folder.
os.environ.setdefault("POGDIFF_CACHE", tempfile.mkdtemp(prefix="pogdiff-test-cache-"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from pogdiff.config import ModelConfig  # noqa: E402
from pogdiff.data.demo import DemoSpec, make_demo_set  # noqa: E402

SMALL_SPEC = DemoSpec(
    seed=3, n_identities=5, max_count=8, min_count=2, n_eval_per_identity=2,
    n_pretrain_identities=3, n_pretrain_per_identity=3, resolution=32,
)
SMALL_MODEL = ModelConfig(block_out_channels=(8, 16, 32), resolution=32)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny convolutions run far faster single-threaded on a small, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """A 5-identity long-tailed demo set on disk (train / eval / pretrain folders)."""
    return make_demo_set(tmp_path_factory.mktemp("demo") / "set", SMALL_SPEC)
