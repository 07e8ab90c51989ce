"""Shared fixtures: a tiny synthetic data set and the flags of a tiny, fast run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Before anything imports fastdeit.kernels: without a GPU, Triton kernels run in Triton's
# interpreter on the CPU (fp32/fp16 only, one config).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Stored file indexes and demo choices that tests (and the CLI processes they start) write go to
# a folder of this session, not to the user's cache.
os.environ.setdefault("FASTDEIT_CACHE", tempfile.mkdtemp(prefix="fastdeit-test-cache-"))

from fastdeit.data.synthetic import write_synthetic

from tiny import TINY_SET


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    write_synthetic(root, TINY_SET)
    return root


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet10t of random weights for the tiny data set's 3 classes (speed and plumbing do
    not depend on the weights)."""
    import timm

    path = tmp_path_factory.mktemp("teacher") / "t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=3).state_dict(), path)
    return path
