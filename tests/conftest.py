"""Shared pytest configuration: hypothesis profiles and the `gpu` marker's skip."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    """The tiny prepared dataset (`tests/tiny_dataset.py`), built once per session. Tests must not modify
    it in place: copy it first (`shutil.copytree`)."""
    from tests.tiny_dataset import make_prepared_dataset

    return make_prepared_dataset(tmp_path_factory.mktemp("prepared"))
