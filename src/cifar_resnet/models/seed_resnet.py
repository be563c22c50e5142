"""The ResNet of the reference assignment (IE534 HW4), built exactly as its text describes."""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """conv3x3(stride s) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut.

    The shortcut is the input itself, or a 1x1 conv with stride ``s`` where ``s > 1``. As in the
    seed's text, there is no ReLU after the addition: the block returns the plain sum.
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.shortcut = nn.Conv2d(channels, channels, 1, stride=stride) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Residual sum, without a final ReLU."""
        return self.body(x) + self.shortcut(x)


def stage(channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks of ``channels``; the first has stride ``stride``."""
    return nn.Sequential(*(BasicBlock(channels, stride if i == 0 else 1) for i in range(blocks)))


class SeedResNet(nn.Module):
    """The scratch network for 3x32x32 inputs, in the seed's order.

    Convolutions followed by BatchNorm have no bias (BN's shift replaces it); the others
    (stem, 1x1 channel up-sampling, strided shortcuts) have one.
    """

    def __init__(self, num_classes: int = 100, dropout: float = 0.3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(32),
            nn.Dropout(dropout),
        )
        self.stages = nn.Sequential(
            stage(32, blocks=2, stride=1),
            nn.Conv2d(32, 64, 1),
            stage(64, blocks=4, stride=2),
            nn.Conv2d(64, 128, 1),
            stage(128, blocks=4, stride=2),
            nn.Conv2d(128, 256, 1),
            stage(256, blocks=2, stride=2),
        )
        self.pool = nn.MaxPool2d(4, stride=4)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``(N, 3, 32, 32)``."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
