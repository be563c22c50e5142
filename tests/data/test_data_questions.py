"""Who answers what: the DataModule (class names, superclasses, displayable images, its checkpoint state)
and the module's evaluation metrics (the confusion matrix the figures and reports read)."""

from __future__ import annotations

from pathlib import Path

import torch

from cifar_resnet import ScratchResNet
from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.data.archive import load_cifar100


def test_displayable_undoes_the_input_transform(cifar_dir: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(cifar_dir))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    shown = dm.displayable(dm.transform(images))
    assert shown.dtype == torch.uint8 and torch.equal(shown, images)


def test_class_names_and_superclasses_come_from_the_archive(cifar_dir: Path) -> None:
    archive = load_cifar100(cifar_dir / "cifar-100-python")
    dm = CIFAR100DataModule(data_dir=str(cifar_dir))
    assert dm.class_names == archive.class_names and dm.superclass_names == archive.superclass_names
    assert torch.equal(dm.fine_to_coarse, archive.fine_to_coarse())


def test_the_checkpoint_state_replaces_the_archive_and_the_configs_input_settings(cifar_dir: Path, tmp_path: Path) -> None:
    trained = CIFAR100DataModule(data_dir=str(cifar_dir), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), output_size=48)
    state = trained.state_dict()
    # A machine without the archive, whose config says other input settings.
    elsewhere = CIFAR100DataModule(data_dir=str(tmp_path / "nothing-here"), output_size=224)
    elsewhere.load_state_dict(state)
    assert elsewhere.class_names == trained.class_names and elsewhere.superclass_names == trained.superclass_names
    assert torch.equal(elsewhere.fine_to_coarse, trained.fine_to_coarse)
    assert elsewhere.transform.output_size == 48 and elsewhere.hparams.output_size == 48
    assert torch.allclose(elsewhere.transform.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(elsewhere.transform.std.flatten(), torch.tensor([0.4, 0.5, 0.6]))
    assert not (tmp_path / "nothing-here").exists()


def test_the_confusion_matrix_lives_in_the_evaluation_metrics_and_starts_afresh_each_epoch() -> None:
    model = ScratchResNet(num_classes=100)
    assert "confusion_matrix" in model.val_metrics and "confusion_matrix" in model.test_metrics
    assert not hasattr(model, "train_metrics"), "training only counts its hits on the device: no metric objects, no confusion matrix"
    labels = torch.tensor([0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 2, 2, 1]), 100).float()
    for _ in range(2):  # two validation epochs: the second does not add to the first
        model.on_validation_epoch_start()
        model.val_metrics.update(logits, labels)
        confusion = model.confusion_matrix("val")
        assert confusion.sum() == 4 and confusion[0, 0] == 1 and confusion[1, 2] == 1 and confusion[2, 2] == 1 and confusion[2, 1] == 1
    for _ in range(2):
        model.on_test_epoch_start()
        model.test_metrics.update(logits, labels)
    assert torch.equal(model.confusion_matrix("test"), confusion)
