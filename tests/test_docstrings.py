"""The ``>>>`` examples in the library's docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sparse3d

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(sparse3d.__path__, prefix="sparse3d.")
    if not name.startswith("sparse3d.kernels.spconv")  # imports spconv lazily; no examples
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
