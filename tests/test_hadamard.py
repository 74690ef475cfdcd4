import pytest
import torch

from dvdq_core.hadamard import effective_block, hadamard_matrix, rotate


@pytest.mark.parametrize("n", [1, 2, 16, 64, 128, 256])
def test_orthogonal_and_symmetric(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)


def test_rotation_preserves_the_product():
    x, w = torch.randn(7, 384, dtype=torch.float64), torch.randn(20, 384, dtype=torch.float64)
    xr, wr = rotate(x, 128), rotate(w, 128)
    assert torch.allclose(xr @ wr.T, x @ w.T, atol=1e-10)
    assert not torch.allclose(xr, x)


def test_rotation_spreads_an_outlier():
    x = torch.zeros(1, 128)
    x[0, 5] = 100.0
    assert rotate(x, 128).abs().max() == pytest.approx(100.0 / 128**0.5)


def test_effective_block():
    assert effective_block(128, 5120) == 128 and effective_block(128, 1536) == 128
    assert effective_block(256, 96) == 32 and effective_block(128, 7) == 1
    with pytest.raises(ValueError):
        effective_block(96, 192)
