"""The program's callbacks, a module per job. Configs and old runs' ``config.yaml`` name them as
``cifar_resnet.callbacks.<Name>``, so every one is importable from here.

- :mod:`.speed`: ``SpeedMonitor``, ``WallClock`` (speed, warm-up and where the wall time went)
- :mod:`.class_figures`: ``ClassFigures`` (per-class pictures, drawn in the background)
- :mod:`.hparams`: ``HParamsSummary`` (the HPARAMS tab)
- :mod:`.progress`: ``FixedFormatProgressBar``
- :mod:`.safety`: ``StopOnNonFiniteLoss``, ``StopChildProcessesOnError``, ``RunFolderLock``
"""

from cifar_resnet.callbacks.class_figures import ClassFigures, class_figures_job, data_questions, figures_after_test_job
from cifar_resnet.callbacks.hparams import HParamsSummary, flat_hparams, tensorboard, without_unset_switches
from cifar_resnet.callbacks.progress import FixedFormatProgressBar, fixed_format
from cifar_resnet.callbacks.safety import RunFolderLock, StopChildProcessesOnError, StopOnNonFiniteLoss
from cifar_resnet.callbacks.speed import SpeedMonitor, WallClock, process_start_time

__all__ = [
    "ClassFigures",
    "FixedFormatProgressBar",
    "HParamsSummary",
    "RunFolderLock",
    "SpeedMonitor",
    "StopChildProcessesOnError",
    "StopOnNonFiniteLoss",
    "WallClock",
    "class_figures_job",
    "data_questions",
    "figures_after_test_job",
    "fixed_format",
    "flat_hparams",
    "process_start_time",
    "tensorboard",
    "without_unset_switches",
]
