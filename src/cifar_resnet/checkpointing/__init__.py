"""Checkpoints that survive a kill, load without running code, fit the model they are loaded into, and
fail with errors that name the file; a module per job. Configs and old runs' ``config.yaml`` name the
checkpoint IO as ``cifar_resnet.checkpointing.<Name>``, so everything is importable from here.

- :mod:`.compatibility`: reading a checkpoint and checking it fits the model (schema, network settings)
- :mod:`.writers`: ``AtomicCheckpointIO``, ``BackgroundCheckpointIO``
- :mod:`.last`: ``LastCheckpoint`` and finding a run's newest checkpoint
- :mod:`.random_states`: ``RandomStates``
- the atomic file writer itself is :mod:`cifar_resnet.atomic`
"""

from cifar_resnet.atomic import atomic_save, atomic_write, atomic_write_text, write_error_message
from cifar_resnet.checkpointing.compatibility import (
    NETWORK_SETTINGS,
    SCHEMA_KEY,
    SCHEMA_VERSION,
    check_checkpoint_fits,
    check_optimizer_fits,
    damaged_part,
    network_settings,
    read_checkpoint,
    setting_defaults,
    stamp_schema,
)
from cifar_resnet.checkpointing.last import LAST, LastCheckpoint, find_last_checkpoint, newest_checkpoint
from cifar_resnet.checkpointing.random_states import RandomStates, rng_states, set_rng_states
from cifar_resnet.checkpointing.writers import (
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    checkpoint_host_seconds,
    wait_for_checkpoints,
)

__all__ = [
    "LAST",
    "NETWORK_SETTINGS",
    "SCHEMA_KEY",
    "SCHEMA_VERSION",
    "AtomicCheckpointIO",
    "BackgroundCheckpointIO",
    "LastCheckpoint",
    "RandomStates",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "check_checkpoint_fits",
    "check_optimizer_fits",
    "damaged_part",
    "checkpoint_host_seconds",
    "find_last_checkpoint",
    "network_settings",
    "newest_checkpoint",
    "read_checkpoint",
    "rng_states",
    "set_rng_states",
    "setting_defaults",
    "stamp_schema",
    "wait_for_checkpoints",
    "write_error_message",
]
