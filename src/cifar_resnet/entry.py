"""The ``cifar-resnet`` command's entry point: ``--version`` answers at once, without importing torch;
everything else is :func:`cifar_resnet.cli.main`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from cifar_resnet.errors import UserError
from cifar_resnet.launch_env import check_launcher_variables


def main(args: Any = None) -> None:
    """Print the version for ``cifar-resnet --version``, else run the command (``cifar_resnet.cli.main``)."""
    argv = sys.argv[1:] if args is None else [str(a) for a in args]
    if argv == ["--version"]:
        from cifar_resnet import __version__

        print(f"cifar-resnet {__version__}")
        return
    try:
        check_launcher_variables(os.environ)  # Lightning reads them as it is imported
    except UserError as err:
        print(f"cifar-resnet: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        from cifar_resnet.cli import main as run_command  # seconds: torch, Lightning
    except KeyboardInterrupt:
        stopped_while_starting()
    run_command(args)


def stopped_while_starting() -> None:
    """End a command that Ctrl-C stopped while it was importing, in one line, with exit code 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
    print("cifar-resnet: stopped by SIGINT while starting; nothing was done, run the command again.", file=sys.stderr, flush=True)
    raise SystemExit(128 + signal.SIGINT)
