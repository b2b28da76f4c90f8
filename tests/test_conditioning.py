"""Condition helpers: feature-folder lookup, padding and resizing of condition maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from recipes.flux3d.conditioning import (
    extractor_for_feature,
    find_feature_folder,
    pad_to_multiple,
    resize_to_multiple,
)


def test_feature_folder_helpers(tmp_path):
    (tmp_path / "features" / "b").mkdir(parents=True)
    assert find_feature_folder(tmp_path) == "b"
    (tmp_path / "features" / "a").mkdir()
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        find_feature_folder(tmp_path)
    assert find_feature_folder(tmp_path, "a") == "a"
    assert (
        extractor_for_feature("flux_vae") == "flux-vae" and extractor_for_feature("x", "dinov2") == "dinov2"
    )
    with pytest.raises(ValueError, match="extractor: expected one of"):
        extractor_for_feature("rgb", "clip")


@given(
    height=st.integers(1, 9), width=st.integers(1, 9), multiple=st.integers(1, 4), channels=st.integers(1, 3)
)
def test_pad_to_multiple_matches_dense_reference(height, width, multiple, channels):
    maps = torch.randn(2, channels, height, width)
    padded = pad_to_multiple(maps, multiple)
    expected = np.zeros((2, channels, -(-height // multiple) * multiple, -(-width // multiple) * multiple))
    expected[:, :, :height, :width] = maps.numpy()
    np.testing.assert_array_equal(padded.numpy(), expected.astype(np.float32))


@given(height=st.integers(8, 40), width=st.integers(8, 40), multiple=st.sampled_from([1, 2, 8]))
def test_resize_to_multiple(height, width, multiple):
    images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * 41 + width))
    out = resize_to_multiple(images, multiple)
    assert out.shape[2:] == (height - height % multiple, width - width % multiple)
    assert bool((out >= 0).all() and (out <= 1).all())
    if height % multiple == 0 and width % multiple == 0:
        assert out is images
    else:  # antialiased resize keeps the mean colour
        torch.testing.assert_close(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.05, rtol=0)
