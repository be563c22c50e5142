"""Where ``torch.compile`` keeps what it compiled, so that a second run of a recipe finds it."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

DEFAULT_FOLDER = "~/.cache/cifar-resnet/compile"


def default_folder() -> str:
    """``$XDG_CACHE_HOME/cifar-resnet/compile`` (``~/.cache/cifar-resnet/compile`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME")
    return str(Path(base) / "cifar-resnet" / "compile") if base else DEFAULT_FOLDER


class CompileCache(Callback):
    """Keeps torch.compile's caches (Inductor's FX-graph and AOTAutograd caches, and Triton's kernels,
    which Inductor keeps beside them) in one folder that outlives the run, so a second run of the same
    recipe loads its compiled code instead of compiling it again. torch's own default is a folder under
    ``/tmp``, which containers and batch schedulers often start empty. ``TORCHINDUCTOR_CACHE_DIR``, when
    set, wins.
    """

    def __init__(self, folder: str | None = None) -> None:
        """
        Args:
            folder: The cache folder (default ``$XDG_CACHE_HOME/cifar-resnet/compile``, i.e.
                ``~/.cache/cifar-resnet/compile``); delete it to compile afresh.
        """
        self.folder = folder

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Point torch's caches at the folder before the module compiles (in its own ``setup``, after this)."""
        use_cache_folder(self.folder or default_folder())


def use_cache_folder(folder: str | Path) -> Path:
    """Make Inductor keep its caches in ``folder`` (unless ``TORCHINDUCTOR_CACHE_DIR`` is set); returns the one used.

    Inductor reads the variable whenever it compiles, so this must run before the first compile. Importing
    torch may already have set it to torch's default, which counts as not set.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(folder).expanduser())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # Inductor creates it when it first writes
