"""Config files are checked before jsonargparse reads them, so a file that is no YAML config is named."""

from __future__ import annotations

import os
import sys
from typing import Any

from cifar_resnet.errors import UserError

CONFIG_MAX_BYTES = 16 * 2**20  # a YAML config is a few KiB; a bigger --config file is something else


def check_config_files(args: Any) -> None:
    """Refuse a ``--config`` file in the command line ``args`` (``None``: ``sys.argv``) that is not UTF-8 text
    (a checkpoint, an image, a file saved as Latin-1), naming it: jsonargparse would stop with a bare
    ``UnicodeDecodeError``."""
    argv = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else [])]
    for flag, value in zip(argv, argv[1:] + [""]):
        path = value if flag == "--config" else flag.removeprefix("--config=") if flag.startswith("--config=") else None
        if not path or not os.path.isfile(path):
            continue  # jsonargparse names a missing file itself
        with open(path, "rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise UserError(f"--config '{path}' is over {CONFIG_MAX_BYTES // 2**20} MiB: not a YAML config. Pass a recipe's .yaml file.")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise UserError(
                f"--config '{path}' is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}): not a YAML config, "
                "or one saved in another encoding. Pass a recipe's .yaml file, saved as UTF-8."
            ) from None
