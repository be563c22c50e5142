"""Weight averaging (src/cifar_resnet/averaging.py) as users rely on it: validation during a fit, and test and
predict from a checkpoint, use the averaged (EMA) weights that the checkpoint holds as its ``state_dict``, not
the trained weights it holds as ``current_model_state`` (docs/recipes.md, "The switches")."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from cifar_resnet import CIFAR100DataModule, ScratchResNet
from cifar_resnet.averaging import EMAWeights

LIGHTNING_LEAFSPEC = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


def evaluate(weights: dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The loss and the class probabilities of a ScratchResNet holding ``weights`` on normalised ``images``."""
    model = ScratchResNet()
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    return float(F.cross_entropy(logits, labels)), logits.softmax(-1)


@LIGHTNING_LEAFSPEC
@pytest.mark.filterwarnings("ignore:.*loading a checkpoint outside the 'fit' stage")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_validation_test_and_predict_use_the_averaged_weights(cifar_dir: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = ScratchResNet(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    data = CIFAR100DataModule(str(cifar_dir), val_size=50, batch_size=25, eval_batch_size=50)
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=1, limit_test_batches=1,
        limit_predict_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[EMAWeights(decay=0.5), ModelCheckpoint(dirpath=tmp_path, filename="epoch", save_top_k=-1)],
    )  # fmt: skip
    trainer.fit(model, data)
    val_loss = float(trainer.callback_metrics["val/loss"])
    # Written after the epoch's validation, as the recipes' checkpoints are (a checkpoint written after the fit
    # would hold the average twice: Lightning copies it into the model when training ends).
    last = tmp_path / "epoch.ckpt"
    # weights_only=False: the hyper-parameters hold the optimizer as a functools.partial; the file is our own.
    checkpoint = torch.load(last, weights_only=False)
    averaged, trained = checkpoint["state_dict"], checkpoint["current_model_state"]

    data.setup("fit")
    val_images, val_labels = next(iter(data.val_dataloader()))
    val_images = data.transform(val_images)
    loss_averaged, _ = evaluate(averaged, val_images, val_labels)
    loss_trained, _ = evaluate(trained, val_images, val_labels)
    # The two weight sets must tell apart, or the test would prove nothing.
    assert abs(loss_averaged - loss_trained) > 1e-3, (loss_averaged, loss_trained)
    assert val_loss == pytest.approx(loss_averaged, rel=1e-4), "validation did not use the averaged weights"

    data.setup("test")
    test_images, test_labels = next(iter(data.test_dataloader()))
    test_images = data.transform(test_images)
    test_averaged, probs_averaged = evaluate(averaged, test_images, test_labels)
    test_trained, probs_trained = evaluate(trained, test_images, test_labels)
    assert abs(test_averaged - test_trained) > 1e-3, (test_averaged, test_trained)
    # As `cifar-resnet test` and `predict` run: a new process, the recipe's callbacks, the checkpoint's weights.
    evaluator = Trainer(
        accelerator="cpu", limit_test_batches=1, limit_predict_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[EMAWeights(decay=0.5)],
    )  # fmt: skip
    model = ScratchResNet()
    (result,) = evaluator.test(model, data, ckpt_path=str(last), verbose=False, weights_only=False)
    assert result["test/loss"] == pytest.approx(test_averaged, rel=1e-4), "test did not use the averaged weights"

    (batch,) = evaluator.predict(model, data, ckpt_path=str(last), weights_only=False)
    expected, _ = probs_averaged.topk(5, dim=-1)
    assert torch.allclose(batch["probs"], expected, atol=1e-5), "predict did not use the averaged weights"
    assert not torch.allclose(batch["probs"], probs_trained.topk(5, dim=-1).values, atol=1e-5)
