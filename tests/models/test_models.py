"""The two networks: the seed ResNet's exact structure, and ResNet18's weight loading."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cifar_resnet.errors import UserError
from cifar_resnet.models import BasicBlock, SeedResNet, load_imagenet_weights, resnet18_for_cifar


def test_seed_resnet_layer_sequence() -> None:
    net = SeedResNet()
    assert [type(m) for m in net.stem] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Dropout]
    assert (net.stem[0].in_channels, net.stem[0].out_channels, net.stem[0].kernel_size) == (3, 32, (3, 3))
    assert net.stem[3].p == 0.3
    layout = []
    for part in net.stages:
        if isinstance(part, nn.Conv2d):
            assert part.kernel_size == (1, 1)
            layout.append(f"up{part.in_channels}->{part.out_channels}")
        else:
            blocks = list(part)
            assert all(isinstance(b, BasicBlock) for b in blocks)
            layout.append([(b.body[0].out_channels, b.body[0].stride[0]) for b in blocks])
    assert layout == [
        [(32, 1), (32, 1)],
        "up32->64",
        [(64, 2), (64, 1), (64, 1), (64, 1)],
        "up64->128",
        [(128, 2), (128, 1), (128, 1), (128, 1)],
        "up128->256",
        [(256, 2), (256, 1)],
    ]
    block = net.stages[2][0]
    assert [type(m) for m in block.body] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    assert isinstance(block.shortcut, nn.Conv2d) and block.shortcut.stride == (2, 2)
    assert isinstance(net.stages[2][1].shortcut, nn.Identity)
    assert (net.pool.kernel_size, net.pool.stride) == (4, 4)
    assert (net.fc.in_features, net.fc.out_features) == (256, 100)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_seed_resnet_parameter_count_matches_hand_count() -> None:
    def conv(cin: int, cout: int, k: int, bias: bool) -> int:
        return cin * cout * k * k + (cout if bias else 0)

    def block(c: int, stride: int) -> int:
        body = 2 * conv(c, c, 3, bias=False) + 2 * (2 * c)  # two convs and two BatchNorms (weight, bias)
        return body + (conv(c, c, 1, bias=True) if stride > 1 else 0)

    expected = conv(3, 32, 3, True) + 2 * 32  # stem conv + BatchNorm
    expected += 2 * block(32, 1)
    for cin, c, n in ((32, 64, 4), (64, 128, 4), (128, 256, 2)):
        expected += conv(cin, c, 1, True) + block(c, 2) + (n - 1) * block(c, 1)
    expected += 256 * 100 + 100
    assert sum(p.numel() for p in SeedResNet().parameters()) == expected == 4_032_676


def test_basic_block_has_no_relu_after_the_addition() -> None:
    block = BasicBlock(8).eval()
    out = block(-torch.ones(1, 8, 4, 4) * 10)
    assert out.min() < 0, "a ReLU after the sum would make every output non-negative"


def test_resnet18_loads_a_torchvision_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    model = resnet18_for_cifar(100)
    load_imagenet_weights(model, weights="IMAGENET1K_V1", weights_path=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    assert model.fc.out_features == 100


def test_missing_weights_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.pth' not found.*resnet18-f37072fd\.pth"):
        load_imagenet_weights(resnet18_for_cifar(), weights_path=tmp_path / "missing.pth")


def test_weights_unreachable_offline_names_the_cache_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError) as err:
        load_imagenet_weights(resnet18_for_cifar(), weights="IMAGENET1K_V1")
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(cached) in str(err.value) and "weights_path" in str(err.value)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="not a torchvision ResNet18 state dict.*unexpected: layer"):
        load_imagenet_weights(resnet18_for_cifar(), weights_path=tmp_path / "r34.pth")


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Every module ``module`` imports, following the project's own modules (not the package ``__init__``)."""
    import ast
    import importlib.util

    seen = set() if seen is None else seen
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            if name not in seen:
                seen.add(name)
                if name.startswith("cifar_resnet.") and importlib.util.find_spec(name) is not None:
                    imported_modules(name, seen)
    return seen


def test_models_are_plain_torch_and_import_no_lightning() -> None:
    imports = imported_modules("cifar_resnet.models")
    assert "torch" in imports and "cifar_resnet.models.seed_resnet" in imports
    assert not {name for name in imports if name.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics")}
    # The check follows the project's imports: the classifier, which wraps the models, does import Lightning.
    assert any(name.startswith("lightning") for name in imported_modules("cifar_resnet.classifier"))
