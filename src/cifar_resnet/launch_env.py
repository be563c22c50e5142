"""The variables a launcher (torchrun, Lightning's DDP launcher) sets for each process, checked before
Lightning reads them (it does as it is imported)."""

from __future__ import annotations

from collections.abc import Mapping

from cifar_resnet.errors import UserError

# Variables a launcher (torchrun, Lightning's own DDP launcher) sets for each process it starts.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def check_launcher_variables(environ: Mapping[str, str]) -> None:
    """Refuse launcher variables that no launcher set: a ``RANK`` or ``LOCAL_RANK`` above 0 without a
    ``WORLD_SIZE`` to match makes the only process a rank other than 0, which writes nothing and, with
    several devices, waits for a rank 0 that never comes; a value that is not a number stops Lightning."""
    for name in LAUNCHER_VARIABLES:
        value = environ.get(name)
        if value is not None and not value.strip().isdigit():
            raise UserError(f"The environment variable {name}={value!r} is not a whole number 0 or more: unset it (`unset {name}`), or start the processes with torchrun.")
    world = environ.get("WORLD_SIZE")
    for name in ("RANK", "LOCAL_RANK"):
        rank = int(environ.get(name) or 0)
        if rank > 0 and (world is None or rank >= int(world)):
            size = "is not set" if world is None else f"is {world}"
            raise UserError(
                f"The environment says this process is rank {rank} ({name}={rank}), but WORLD_SIZE {size}: no launcher "
                f"started it. Unset {name} (`unset {name}`); for several devices use --trainer.devices N, or torchrun "
                "(docs/multi-gpu.md)."
            )
