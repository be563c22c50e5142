"""Exporting a trained checkpoint for deployment: the network as ONNX (for onnxruntime) or a ``torch.export`` program,
with a JSON file beside it that holds the class names and the input settings.

Run it as ``cifar-resnet-export CKPT model.onnx`` or ``python -m cifar_resnet.export``.
"""

from __future__ import annotations

import inspect
import json
import reprlib
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import auto_cli
from torch import nn

from cifar_resnet.atomic import atomic_write, atomic_write_text
from cifar_resnet.checkpointing import check_checkpoint_fits, network_settings, read_checkpoint, setting_defaults
from cifar_resnet.classifier import FineTunedResNet18, ImageClassifier, ScratchResNet
from cifar_resnet.config_files import check_config_files
from cifar_resnet.data.archive import NUM_CLASSES
from cifar_resnet.data.images import SHRINK_ABOVE_PIXELS, read_images
from cifar_resnet.errors import UserError
from cifar_resnet.outputs import check_output

DATAMODULE_KEY = "CIFAR100DataModule"
MODELS = {"ScratchResNet": ScratchResNet, "FineTunedResNet18": FineTunedResNet18}


def network_of(checkpoint: dict[str, Any], path: str | None = None) -> nn.Module:
    """The checkpoint's network as a plain ``nn.Module`` in eval mode, weights loaded (no Lightning module), once
    the checkpoint passed the check that ``fit``, ``test`` and ``predict`` make (its weights fit the network)."""
    hparams = checkpoint.get("hyper_parameters", {})
    kind = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
    if kind not in MODELS:
        raise UserError(f"The checkpoint holds a {kind or 'model of unknown kind'}; export knows {' and '.join(MODELS)}.")
    # The model builds its own network from the settings that say what it is; a setting the checkpoint
    # predates was trained as its default says (checkpointing.check_checkpoint_fits).
    model_class = MODELS[kind]
    if hparams.get("num_classes", NUM_CLASSES) != NUM_CLASSES:  # checked before a head of that many outputs is built
        raise UserError(
            f"The checkpoint '{path}' is damaged or was not written by this program: it holds a model of "
            f"num_classes={reprlib.repr(hparams['num_classes'])}, but CIFAR-100, whose class names it holds, has {NUM_CLASSES} "
            "classes. Pass a checkpoint from a run's checkpoints/ folder."
        )
    try:
        model = model_class(**{name: hparams[name] for name in network_settings(model_class) if name in hparams})
    except (UserError, TypeError, ValueError) as err:
        raise UserError(
            f"The checkpoint '{path}' is damaged or was not written by this program: its settings do not build a {kind} "
            f"({str(err).rstrip('.')}). Pass a checkpoint from a run's checkpoints/ folder."
        ) from err
    # Built from the checkpoint's own settings, the model differs from it only where the file is damaged.
    damaged = "It is damaged or was not written by this program: pass a checkpoint from a run's checkpoints/ folder."
    check_checkpoint_fits(model, checkpoint, path, fix=damaged)
    net = model.net
    net.load_state_dict({k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")})
    return net.eval()


def deployment_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Class names and the input settings stored in the checkpoint by the DataModule."""
    data = checkpoint.get(DATAMODULE_KEY)
    if not data or "class_names" not in data:
        raise UserError(
            "The checkpoint holds no class names (it was written by an older version of cifar-resnet): "
            "test or fine-tune it for one epoch with this version to get a checkpoint that has them."
        )
    transform = data["transform"]
    size = transform["output_size"]
    tta = bool({**setting_defaults(ImageClassifier), **checkpoint.get("hyper_parameters", {})}.get("tta"))
    return {
        "class_names": list(data["class_names"]),
        "superclass_names": list(data["superclass_names"]),
        "fine_to_coarse": list(data["fine_to_coarse"]),
        "input": {
            "shape": ["batch", 3, transform["output_size"], transform["output_size"]],
            "dtype": "float32",
            "how": "the steps in `preprocessing`, in order, from an image file to this input",
            "mean": list(transform["mean"]),
            "std": list(transform["std"]),
            "preprocessing": preprocessing_steps(size, tta),
        },
        "output": "logits, one per class in class_names order (softmax gives probabilities)",
        "tta": tta,
    }


def preprocessing_steps(output_size: int, tta: bool) -> list[str]:
    """Every step ``cifar-resnet predict`` takes from an image file to the network's input and to the
    probabilities it writes (cifar_resnet.data.images.read_image, then the DataModule's BatchTransform)."""
    read_size = inspect.signature(read_images).parameters["size"].default
    steps = [
        f"Open the file with Pillow; a JPEG is decoded in draft mode, at a reduced scale no smaller than {4 * read_size}x{4 * read_size} (Image.draft('RGB', ({4 * read_size}, {4 * read_size}))).",
        f"An image of more than {SHRINK_ABOVE_PIXELS} pixels after that: cut its centred square (side = the shorter side, left = (width - side) // 2, "
        f"top = (height - side) // 2) and shrink it by box averaging with Image.reduce(max(1, side // {4 * read_size})), in RGB (convert('RGB') first), "
        "or, for 16-bit, 32-bit integer and float greyscale, in float (mode 'F'); the range scaling below still uses the whole image's lowest and highest values.",
        "Turn it upright as its EXIF orientation tag says (PIL.ImageOps.exif_transpose).",
        "16-bit, 32-bit integer and float greyscale images: scale their real range to 8 bits (0-65535 -> /257, float 0-1 -> x255, any other range stretched to 0-255); 8-bit images stay as they are.",
        "Convert to RGB with Pillow's convert('RGB'): a palette image takes its palette's colours, greyscale is repeated in R, G and B, and an alpha channel is dropped (not composited over any background).",
        f"Centre-crop to a square and resize it to {read_size}x{read_size} with Lanczos filtering, in uint8 (PIL.ImageOps.fit(image, ({read_size}, {read_size}), Image.Resampling.LANCZOS)).",
        "Scale to float32 in [0, 1] (divide by 255), subtract `mean` and divide by `std`, per channel; lay it out as (3, H, W), channels R, G, B.",
    ]
    if output_size != read_size:
        steps.append(
            f"Resize to {output_size}x{output_size}, bilinear with antialiasing, align_corners=False "
            f"(torch.nn.functional.interpolate(x, size=({output_size}, {output_size}), mode='bilinear', align_corners=False, antialias=True))."
        )
    if tta:
        steps.append("Test-time augmentation: run the network on the image and on its mirror image (flipped left-right) and average the two logits.")
    steps.append("Softmax over the logits gives the probabilities; predict writes the 5 largest.")
    return steps


def export(ckpt_path: str, output: str, format: Literal["onnx", "torch.export"] = "onnx", weights_only: bool = True) -> Path:
    """Export a checkpoint's network for deployment, with the class names and input settings in ``output``.json.

    Args:
        ckpt_path: A checkpoint written by ``cifar-resnet fit`` (e.g. runs/scratch/version_0/checkpoints/last.ckpt).
        output: The file to write, e.g. ``model.onnx`` or ``model.pt2`` (and ``output``.json). An existing file is
            replaced only if it is an earlier export of the same format; never the checkpoint or a file of another kind.
        format: ``onnx`` (run it with onnxruntime) or ``torch.export`` (``torch.export.load``; a PyTorch program).
        weights_only: Load the checkpoint with ``torch.load(weights_only=True)``; false only for a trusted file.
    """
    path = Path(output)
    check_output(path, format, "The output", inputs=[ckpt_path])
    check_output(Path(f"{path}.json"), "report", "The output's JSON file", inputs=[ckpt_path])
    checkpoint = read_checkpoint(ckpt_path, weights_only=weights_only)
    info = deployment_info(checkpoint)
    net = network_of(checkpoint, ckpt_path)
    size = info["input"]["shape"][-1]
    example = torch.zeros(2, 3, size, size)
    batch = {0: torch.export.Dim("batch", min=1)}  # any batch size
    # Written beside the output and renamed over it, so a kill never leaves a torn model file.
    if format == "onnx":
        program = torch.onnx.export(
            net, (example,), input_names=["images"], output_names=["logits"], dynamic_shapes=(batch,), dynamo=True, verbose=False
        )
        atomic_write(path, lambda f: f.write(program.model_proto.SerializeToString()))  # what program.save writes
    else:
        exported = torch.export.export(net, (example,), dynamic_shapes=(batch,))
        atomic_write(path, lambda f: torch.export.save(exported, f))
    atomic_write_text(f"{path}.json", json.dumps(info, indent=2) + "\n")
    return path


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cifar-resnet-export``, with mistakes reported as one clear paragraph."""
    try:
        check_config_files(args)
        path = auto_cli(export, args=args, prog="cifar-resnet-export")
    except UserError as err:
        print(f"cifar-resnet-export: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Wrote {path} and {path}.json (class names, input settings)")


if __name__ == "__main__":
    main()
