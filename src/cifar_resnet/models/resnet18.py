"""torchvision's ResNet18 with a 100-way head, and loading its ImageNet weights online or offline."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights, resnet18

from cifar_resnet.errors import UserError
from cifar_resnet.models.state_dicts import state_dict_mismatch
from cifar_resnet.tensor_files import UnreadableFile, UnsafeFile, load_tensors, not_a_file


def resnet18_for_cifar(num_classes: int = 100) -> ResNet:
    """torchvision ``resnet18`` (random init) with ``fc`` replaced by ``Linear(512, num_classes)``."""
    model = resnet18()
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _weights_enum(weights: str) -> ResNet18_Weights:
    """The torchvision weights entry called ``weights``, with a clear error for a wrong name."""
    try:
        return ResNet18_Weights[weights]
    except KeyError:
        names = ", ".join(w.name for w in ResNet18_Weights)
        raise UserError(f"Unknown ResNet18 weights '{weights}': choose one of {names} (or DEFAULT).") from None


def _download_state_dict(weights: str) -> dict[str, torch.Tensor]:
    """Fetch (or read from torch's hub cache) the torchvision weights called ``weights``."""
    entry = _weights_enum(weights)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(entry.url).name
    try:
        return entry.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"Cannot get the ResNet18 {entry.name} weights ({err}). Offline, download {entry.url} elsewhere and "
            f"either put it at '{cached}' (torch's cache, used automatically) or pass "
            "`--model.init_args.weights_path <file.pth>`."
        ) from err


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a torchvision-format state dict with ``weights_only=True`` (a file cannot run code)."""
    problem = not_a_file(path)
    if problem:
        raise UserError(
            f"Weights file '{path}' {problem}. Put torchvision's resnet18 ImageNet weights there "
            f"({ResNet18_Weights.IMAGENET1K_V1.url}) or fix `weights_path`."
        )
    try:
        state = load_tensors(path)
    except (UnreadableFile, UnsafeFile) as err:
        raise UserError(
            f"Cannot read weights file '{path}': it is truncated, corrupt or not a plain state dict ({err}). "
            "Save it with `torch.save(model.state_dict(), path)` or download it again."
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Weights file '{path}' does not hold a state dict (a dict of tensors) in torchvision's format.")
    return state


def load_imagenet_weights(model: ResNet, weights: str | None = None, weights_path: str | Path | None = None) -> None:
    """Load ImageNet weights into every layer of ``model`` except ``fc``.

    ``weights_path`` (a local file) wins over ``weights`` (a torchvision weights name).
    """
    if weights_path is not None:
        source, state = f"'{weights_path}'", _read_state_dict(Path(weights_path))
    elif weights is not None:
        source, state = f"torchvision's {weights}", _download_state_dict(weights)
    else:
        return
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    details = state_dict_mismatch(expected, backbone)
    if details:
        raise UserError(
            f"The weights in {source} are not a torchvision ResNet18 state dict ({details}). Use the file of "
            f"{ResNet18_Weights.IMAGENET1K_V1.url}."
        )
    model.load_state_dict(backbone, strict=False)
