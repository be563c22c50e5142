"""The on-device batch transforms against torchvision's per-image reference transforms."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.data.transforms import CIFAR100_MEAN, CIFAR100_STD, BatchTransform, flip_by_mask, input_settings_problem
from cifar_resnet.errors import UserError

STD = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def reference(images: torch.Tensor, *steps) -> torch.Tensor:
    """torchvision's classic pipeline, one PIL image at a time (what the seed did)."""
    pipeline = T.Compose([*steps, T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    return torch.stack([pipeline(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])


def test_normalisation_matches_torchvision_exactly(batch: torch.Tensor) -> None:
    assert torch.equal(BatchTransform()(batch, train=False), reference(batch))


@pytest.mark.parametrize(("hflip", "vflip"), [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_flips_match_torchvision_exactly(batch: torch.Tensor, hflip: float, vflip: float) -> None:
    ours = BatchTransform(hflip_prob=hflip, vflip_prob=vflip)(batch, train=True)
    assert torch.equal(ours, reference(batch, T.RandomHorizontalFlip(hflip), T.RandomVerticalFlip(vflip)))


def test_mixed_flips_give_each_image_one_of_its_four_orientations(batch: torch.Tensor) -> None:
    images = batch.repeat(20, 1, 1, 1)  # 480 images: every kind of flip is drawn many times
    torch.manual_seed(0)
    out = BatchTransform(hflip_prob=0.5, vflip_prob=0.5)(images, train=True)
    normalised = BatchTransform()(images)
    kinds = torch.stack([
        (out == normalised.flip(dims)).flatten(1).all(1) for dims in ((), (-1,), (-2,), (-2, -1))
    ])  # fmt: skip
    assert torch.equal(kinds.sum(0), torch.ones(len(images), dtype=torch.long))  # each image is exactly one
    assert all(80 < count < 160 for count in kinds.sum(1).tolist())  # Binomial(480, 1/4): mean 120, sd 9.5


def test_flip_by_mask_flips_exactly_the_chosen_images(batch: torch.Tensor) -> None:
    hflip, vflip = torch.rand(2, len(batch), generator=torch.Generator().manual_seed(1)) < 0.5
    assert hflip.any() and vflip.any() and (hflip & vflip).any() and not (hflip | vflip).all()
    out = flip_by_mask(batch, hflip, vflip)
    for image, flipped, h, v in zip(batch, out, hflip.tolist(), vflip.tolist()):
        dims = [d for d, chosen in ((-2, v), (-1, h)) if chosen]
        assert torch.equal(flipped, image.flip(dims) if dims else image)


def test_no_flips_outside_training(batch: torch.Tensor) -> None:
    transform = BatchTransform(hflip_prob=1.0, vflip_prob=1.0)
    assert torch.equal(transform(batch, train=False), reference(batch))


def test_each_image_is_flipped_independently_with_the_given_probability() -> None:
    images = torch.arange(32, dtype=torch.uint8).view(1, 1, 1, 32).expand(20000, 3, 32, 32)
    torch.manual_seed(0)
    out = BatchTransform(hflip_prob=0.2)(images, train=True)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    # Binomial(20000, 0.2): standard deviation ~57 images, so +-400 is far beyond chance.
    assert abs(int(flipped.sum()) - 4000) < 400


def test_a_seed_gives_the_same_flips_twice(batch: torch.Tensor) -> None:
    transform = BatchTransform(hflip_prob=0.5, vflip_prob=0.5)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(transform(batch, train=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("size", [224, 64])
def test_resize_matches_torchvision(batch: torch.Tensor, size: int) -> None:
    ours = BatchTransform(output_size=size)(batch, train=False)
    assert ours.shape == (24, 3, size, size)
    # torchvision's tensor Resize (bilinear, antialias) computes the same thing: float rounding only.
    tensor_ref = torch.stack([T.Resize(size)(im) for im in reference(batch)])
    assert (ours - tensor_ref).abs().max() < 1e-5
    # PIL's Resize rounds its result to uint8, so it may differ by up to one grey level (1/255).
    pil_ref = reference(batch, T.Resize(size))
    assert ((ours - pil_ref) * STD).abs().max() <= 1.0001 / 255


def test_datamodule_applies_the_transform_only_while_training(cifar_dir: Path) -> None:
    class FakeTrainer:
        training = True

    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=100, hflip_prob=1.0, vflip_prob=0.0, output_size=48)
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    dm.trainer = FakeTrainer()
    train_view, _ = dm.on_after_batch_transfer((images, labels), 0)
    FakeTrainer.training = False
    eval_view, same_labels = dm.on_after_batch_transfer((images, labels), 0)
    assert train_view.shape == eval_view.shape == (len(labels), 3, 48, 48)
    assert torch.allclose(train_view, eval_view.flip(-1), atol=1e-5) and torch.equal(same_labels, labels)


@pytest.mark.parametrize(
    "settings, expected",
    [({"std": (0.0, 0.25, 0.25)}, "std must be 3 finite numbers greater than 0 (one per channel R, G, B), got (0.0, 0.25, 0.25)."),
     ({"std": (float("inf"), 1, 1)}, "std must be 3 finite numbers greater than 0"),
     ({"mean": (float("nan"), 0.5, 0.5)}, "mean must be 3 finite numbers (one per channel R, G, B), got (nan, 0.5, 0.5)."),
     ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
     ({"output_size": 100000}, "output_size must be at most 1024 (ImageNet models take 224), got 100000."),
     ({"output_size": True}, "output_size must be a positive integer, got True.")],
)  # fmt: skip
def test_input_settings_that_cannot_normalise_are_named(settings: dict, expected: str) -> None:
    good = {"mean": CIFAR100_MEAN, "std": CIFAR100_STD, "output_size": 224}
    assert input_settings_problem(**good) is None  # the control
    assert expected in str(input_settings_problem(**{**good, **settings}))
    with pytest.raises(UserError, match=re.escape(expected)):  # the config's check is the same
        CIFAR100DataModule(**{**good, **settings})
