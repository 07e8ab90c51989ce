"""Shared fixtures: a tiny synthetic data set and the flags of a tiny, fast run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdeit.data.synthetic import write_synthetic

from tiny import TINY_SPEC


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
    write_synthetic(root, TINY_SPEC)
    return root


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)
