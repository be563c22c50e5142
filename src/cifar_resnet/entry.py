"""The ``cifar-resnet`` command's entry point: ``--version`` answers at once, without importing torch;
everything else is :func:`cifar_resnet.cli.main`."""

from __future__ import annotations

import sys
from typing import Any


def main(args: Any = None) -> None:
    """Print the version for ``cifar-resnet --version``, else run the command (``cifar_resnet.cli.main``)."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    if argv == ["--version"]:
        from cifar_resnet import __version__

        print(f"cifar-resnet {__version__}")
        return
    from cifar_resnet.cli import main as run_command

    run_command(args)
