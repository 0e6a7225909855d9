from __future__ import annotations

import torch

from engine.cutouts import make_cutouts


def cutouts(images: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    return make_cutouts(images, options.pop("cutn", 16), 32, torch.Generator().manual_seed(seed), **options)


def test_shape_and_determinism_come_from_the_generator() -> None:
    images = torch.rand(1, 3, 64, 80)
    first = cutouts(images)
    assert first.shape == (16, 3, 32, 32)
    assert torch.equal(first, cutouts(images))
    assert not torch.equal(first, cutouts(images, seed=1))


def test_outside_the_image_is_zero_padding() -> None:
    white = torch.ones(1, 3, 64, 64)
    crops = cutouts(white, cutn=64, noise_factor=0)
    inside = (crops > 0.5).float().mean()
    # Crops of the padded canvas see both the image and its zero border, on average.
    assert 0.15 < inside < 0.85
    assert ((crops < 1e-6) | (crops > 1 - 1e-6)).float().mean() > 0.9


def test_each_image_of_a_batch_gets_its_own_cutouts() -> None:
    images = torch.zeros(2, 3, 64, 64)
    images[0, 0] = 1.0  # red
    images[1, 2] = 1.0  # blue
    crops = cutouts(images, cutn=8, noise_factor=0)
    assert crops.shape[0] == 16
    assert crops[:8, 2].max() < 1e-6 and crops[:8, 0].max() > 0.5
    assert crops[8:, 0].max() < 1e-6 and crops[8:, 2].max() > 0.5


def test_cut_pow_favours_smaller_cutouts() -> None:
    # Smaller crops of the padded canvas fall entirely inside the image more often.
    white = torch.ones(1, 3, 64, 64)

    def fully_inside(cut_pow: float) -> float:
        crops = cutouts(white, cutn=256, noise_factor=0, cut_pow=cut_pow)
        return (crops.amin(dim=(1, 2, 3)) > 0.99).float().mean().item()
    assert fully_inside(4.0) > fully_inside(1.0)


def test_noise_and_gradients() -> None:
    images = torch.full((1, 3, 64, 64), 0.5, requires_grad=True)
    clean = cutouts(images, noise_factor=0)
    noisy = cutouts(images, noise_factor=0.5)
    assert (noisy - clean).abs().mean() > 0.05
    noisy.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
