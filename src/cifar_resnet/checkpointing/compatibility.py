"""Which checkpoints load: read without running code, from this model class, of a schema this program
reads, with the config's network settings; a setting added later takes its default."""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from packaging.version import InvalidVersion, Version
from torch import Tensor

from cifar_resnet.data.datamodule import CIFAR100DataModule, checkpoint_state_problem
from cifar_resnet.errors import UserError
from cifar_resnet.models.state_dicts import state_dict_mismatch
from cifar_resnet.tensor_files import ForeignFile, UnreadableFile, UnsafeFile, check_torch_zip, load_tensors, not_a_file

# Where a checkpoint says which layout it has. Raise SCHEMA_VERSION when a checkpoint's layout changes in a
# way older checkpoints need converting for (a setting renamed or removed, a state moved); a setting added
# with a default that reproduces the old behaviour needs nothing (see :func:`check_checkpoint_fits`).
SCHEMA_KEY = "cifar_resnet"
SCHEMA_VERSION = 1
# The class attribute that lists a model's network settings (see :func:`network_settings`).
NETWORK_SETTINGS = "network_settings"


def stamp_schema(checkpoint: dict[str, Any]) -> None:
    """Record the checkpoint layout's version and the program's in ``checkpoint``."""
    from cifar_resnet import __version__

    checkpoint[SCHEMA_KEY] = {"schema": SCHEMA_VERSION, "program_version": __version__}


def setting_defaults(cls: type) -> dict[str, Any]:
    """Every setting of ``cls``'s constructor and the defaults it has there (``inspect.Parameter.empty``
    for none): the ``__init__`` signatures along the MRO, a subclass's first, followed through ``**kwargs``."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        for parameter in parameters:
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                defaults.setdefault(parameter.name, parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return defaults


def network_settings(cls: type) -> frozenset[str]:
    """The settings that change what ``cls``'s network is: the union of the ``network_settings`` class
    attributes along the MRO, declared beside each constructor. A checkpoint loads only where these equal
    the config's; every other constructor setting may differ (the config's value is used)."""
    names = frozenset().union(*(vars(klass).get(NETWORK_SETTINGS, ()) for klass in cls.__mro__))
    unknown = names - setting_defaults(cls).keys()
    if unknown:
        raise TypeError(f"{cls.__name__}.{NETWORK_SETTINGS} names {', '.join(sorted(unknown))}, which its constructor does not take.")
    return names


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``torch.load`` (``weights_only`` by default), with clear errors: the one
    check every command that reads a checkpoint (fit, validate, test, predict, export) goes through.

    Before ``torch.load``, the file must be laid out as ``torch.save`` writes it (:func:`check_torch_zip`: no
    compressed or overlapping records, no record of another size than its tensors), so a small file cannot take a large
    load; after it, every part must have the shape and values this program writes (:func:`malformed`).
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise UserError(
            f"Checkpoint '{path}' {problem}. Pass a .ckpt file (a run's checkpoints/last.ckpt, say; `cifar-resnet` "
            "also takes `--ckpt_path last`)."
        )
    try:
        check_torch_zip(path)
        checkpoint = load_tensors(path, map_location=map_location, weights_only=weights_only)
    except UnsafeFile as err:
        if err.name:
            raise UserError(
                f"Refusing to load checkpoint '{path}': the file asks to run code ({err.name}) to rebuild objects other "
                "than tensors and plain values, which no checkpoint of this program does. Only load checkpoints this "
                "program wrote."
            ) from err
        raise UserError(
            f"Refusing to load checkpoint '{path}': it holds objects other than tensors and plain values, which "
            f"could run code when loaded ({err}). Only load checkpoints this program wrote."
        ) from err
    except ForeignFile as err:
        raise UserError(
            f"Refusing to load checkpoint '{path}': it is damaged or was not written by this program: {err}. Pass a "
            "checkpoint from a run's checkpoints/ folder."
        ) from err
    except UnreadableFile as err:
        raise UserError(
            f"Cannot read checkpoint '{path}': the file is truncated or corrupt ({err}). Resume from "
            "another checkpoint of the run (the best one, or an earlier copy), or start again."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UserError(
            f"'{path}' is not a Lightning checkpoint of this program (it has no 'state_dict'; a bare state dict "
            "or weights file is not enough). Pass a checkpoint from a run's checkpoints/ folder."
        )
    problem = malformed(checkpoint)
    if problem:
        raise UserError(
            f"'{path}' is damaged or was not written by this program: {problem}. Pass a checkpoint from a run's "
            "checkpoints/ folder."
        )
    return checkpoint


# The types of the parts of a checkpoint that this program and Lightning read (each may be absent).
CHECKPOINT_PARTS: dict[str, type | tuple[type, ...]] = {
    "state_dict": Mapping,
    "hyper_parameters": Mapping,
    "datamodule_hyper_parameters": Mapping,
    SCHEMA_KEY: Mapping,
    "epoch": int,
    "global_step": int,
    "optimizer_states": list,
    "lr_schedulers": list,
    "callbacks": Mapping,
    "loops": Mapping,
    # Lightning's WeightAveraging (EMAWeights) keeps the trained weights beside the average in "state_dict".
    "current_model_state": Mapping,
    "averaging_state": Mapping,
}
# The parts that hold only named tensors.
TENSOR_PARTS = ("state_dict", "current_model_state", "averaging_state")


# The Lightning version a checkpoint records, which Lightning parses to migrate it.
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
# Bounds on the settings a checkpoint carries, far above any this program writes: a crafted file's
# megabyte-long strings would otherwise end up in messages, reports and exported files.
MAX_TEXT = 4096
MAX_ITEMS = 1000
MAX_DEPTH = 16


def malformed(checkpoint: Mapping[str, Any]) -> str | None:
    """What in ``checkpoint`` has a shape or value no checkpoint of this program has (``None``: nothing), so that
    a damaged or crafted file is refused with a sentence, not a traceback from deep inside a load, nor believed:
    the data settings it carries pass the config's own checks."""
    for key, kind in CHECKPOINT_PARTS.items():
        value = checkpoint.get(key)
        if key in checkpoint and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its '{key}' is a {type(value).__name__}"
    for key in (*TENSOR_PARTS, "hyper_parameters", "datamodule_hyper_parameters"):
        if any(not isinstance(k, str) for k in checkpoint.get(key, {})):
            return f"its '{key}' has keys that are not names"
    for key in TENSOR_PARTS:
        if any(not isinstance(v, Tensor) for v in checkpoint.get(key, {}).values()):
            return f"its '{key}' holds values that are not tensors"
    for state in checkpoint.get("optimizer_states", []):
        groups = state.get("param_groups") if isinstance(state, Mapping) else None
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
            return "its 'optimizer_states' are not optimizer states (param_groups with params)"
    schema = checkpoint.get(SCHEMA_KEY, {}).get("schema", 0)
    if not isinstance(schema, int) or isinstance(schema, bool):
        return f"its schema version is a {type(schema).__name__}"
    for key in ("hyper_parameters", "datamodule_hyper_parameters", SCHEMA_KEY):
        problem = _oversized(checkpoint.get(key, {}))
        if problem:
            return f"its '{key}' {problem}"
    version = checkpoint.get(LIGHTNING_VERSION_KEY, "0")
    if not isinstance(version, str) or len(version) > 64 or not _parses(version):
        return f"its '{LIGHTNING_VERSION_KEY}' ({reprlib.repr(version)}) is not a version number"
    if CIFAR100DataModule.__qualname__ in checkpoint:
        problem = checkpoint_state_problem(checkpoint[CIFAR100DataModule.__qualname__])
        if problem:
            return problem
    return (
        _random_states_problem(checkpoint.get("callbacks", {}).get("RandomStates"))
        or _optimizer_states_problem(checkpoint.get("optimizer_states", []))
        or _scheduler_states_problem(checkpoint.get("lr_schedulers", []))
    )


def _scheduler_states_problem(states: list[Any]) -> str | None:
    """What about the LR schedulers' states no torch scheduler writes, or ``None``: each has its step count
    (``last_epoch``) and one base learning rate per parameter group, without which a resume would silently
    start the schedule over."""
    for index, state in enumerate(states):
        base_lrs = state.get("base_lrs") if isinstance(state, Mapping) else None
        if not (
            isinstance(state, Mapping) and type(state.get("last_epoch")) is int and isinstance(base_lrs, list)
            and all(isinstance(lr, (int, float)) and not isinstance(lr, bool) for lr in base_lrs)
        ):  # fmt: skip
            return f"its 'lr_schedulers' state {index} is not the state of a learning-rate scheduler (last_epoch and base_lrs)"
    return None


def check_loops_fit(checkpoint: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose training-loop state (``loops``: epoch and batch counters) lacks a part the
    Trainer's loops have (``fresh``: their ``state_dict()``s by name) or holds it in another form: Lightning would
    stop with a ``KeyError`` or ``AttributeError`` from inside its restore."""
    problem = _form_problem(checkpoint.get("loops"), fresh, "loops")
    if problem:
        raise damaged_part("training-loop state", problem)


def _form_problem(value: Any, like: Any, where: str) -> str | None:
    """Where ``value`` lacks a key of ``like`` or holds a mapping or a whole number where ``like`` holds another thing."""
    if isinstance(like, Mapping):
        if not isinstance(value, Mapping):
            return f"('{where}') is of type {type(value).__name__}, not a mapping"
        for key, part in like.items():
            if key not in value:
                return f"lacks '{where}.{key}'"
            problem = _form_problem(value[key], part, f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(like, int) and not isinstance(like, bool) and (type(value) is not int):
        return f"('{where}') is of type {type(value).__name__}, not a whole number"
    return None


def _oversized(value: Any, depth: int = 0) -> str | None:
    """Where the plain value ``value`` holds text, collections or nesting beyond any setting of this program."""
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return f"holds a text of {len(value):,} characters (at most {MAX_TEXT:,})"
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        if depth > MAX_DEPTH:
            return f"is nested more than {MAX_DEPTH} deep"
        if len(value) > MAX_ITEMS:
            return f"holds a collection of {len(value):,} items (at most {MAX_ITEMS:,})"
        items = [*value.keys(), *value.values()] if isinstance(value, Mapping) else list(value)
        for item in items:
            problem = _oversized(item, depth + 1)
            if problem:
                return problem
    return None


def _parses(version: str) -> bool:
    """Whether ``version`` is a version number Lightning can compare."""
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def _random_states_problem(states: Any) -> str | None:
    """What about the random generators' states (``RandomStates``' part) this program never writes, or ``None``."""
    if states is None:
        return None
    expected = {"cpu": torch.get_rng_state().numel()}
    if not isinstance(states, Mapping) or not set(states) <= {"cpu", "cuda"}:
        return "its random generator states are not a CPU and a CUDA state"
    for device, state in states.items():
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or state.dim() != 1 or state.numel() > 2**16:
            return f"its random generator state ('{device}') is not a generator state (a row of bytes)"
        if device in expected and state.numel() != expected[device]:
            return f"its random generator state ('{device}') has {state.numel()} bytes, not {expected[device]}"
    return None


def _optimizer_states_problem(states: list[Any]) -> str | None:
    """What about the optimizers' states this program never writes (beyond :func:`malformed`'s param_groups), or
    ``None``: parameters are numbered once each, and each parameter's state is named tensors and numbers."""
    for state in states:
        ids = [p for group in state["param_groups"] for p in group["params"]]
        if not all(type(p) is int for p in ids) or len(set(ids)) != len(ids):
            return "its 'optimizer_states' number their parameters other than once each"
        per_parameter = state.get("state", {})
        if not isinstance(per_parameter, Mapping) or not set(per_parameter) <= set(ids):
            return "its 'optimizer_states' hold state of parameters they do not list"
        for value in per_parameter.values():
            if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (Tensor, int, float, list))) for k, v in value.items()
            ):
                return "its 'optimizer_states' hold a parameter state that is not named tensors and numbers"
    return None


def check_checkpoint_fits(module: LightningModule, checkpoint: dict[str, Any], path: str | None = None, fix: str | None = None) -> None:
    """Refuse, with one clear paragraph, a checkpoint of another model class, of a newer program, of other
    network settings than the config's (:func:`network_settings`: ``num_classes``, ``dropout``, ...), or with
    other weight shapes.

    Every other setting may differ: the config's value is used. A checkpoint written before a setting
    existed was trained as that setting's default says (a new setting's default reproduces the old
    behaviour); the default is filled into its ``hyper_parameters``, and one line says so. ``fix``: what the
    user should do instead (default: use the config the checkpoint was trained with).
    """
    name = f" '{path}'" if path else ""
    fix = fix or "Use the config the checkpoint was trained with (config.yaml in its run folder)."
    stamp = checkpoint.get(SCHEMA_KEY) or {}
    schema = stamp.get("schema", 0)
    if schema > SCHEMA_VERSION:
        raise UserError(
            f"The checkpoint{name} was written by a newer cifar-resnet ({stamp.get('program_version', 'unknown')}, checkpoint "
            f"schema {schema}; this one reads up to {SCHEMA_VERSION}). Upgrade cifar-resnet to load it."
        )
    trained = checkpoint.setdefault("hyper_parameters", {})
    kind = str(trained.get("_class_path", "")).rsplit(".", 1)[-1]
    if kind and kind != type(module).__name__:
        raise UserError(
            f"The checkpoint{name} holds a {kind}, but the config asks for a {type(module).__name__}. {fix[:-1]}, "
            "or the recipe in configs/ for that model."
        )
    theirs = {k: v for k, v in trained.items() if not k.startswith("_")}
    ours = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    unknown = sorted(theirs.keys() - ours.keys())
    if theirs and unknown:
        raise UserError(
            f"The checkpoint{name} was written by another version of this program: settings unknown here: "
            f"{', '.join(unknown)}. Load it with the version of cifar-resnet that wrote it."
        )
    missing = sorted(ours.keys() - theirs.keys()) if theirs else []
    if missing:
        defaults = setting_defaults(type(module))
        filled = {k: defaults[k] for k in missing if defaults.get(k, inspect.Parameter.empty) is not inspect.Parameter.empty}
        trained.update(filled)
        theirs.update(filled)
        rank_zero_info(
            f"The checkpoint{name} predates the settings {', '.join(missing)} (checkpoint schema {schema}, this program's "
            f"{SCHEMA_VERSION}); it was trained as their defaults say: {', '.join(f'{k}={v!r}' for k, v in filled.items())}."
        )
    differ = sorted(k for k in network_settings(type(module)) if k in theirs and theirs[k] != ours[k])
    if differ:
        predates = [k for k in differ if k in missing]
        raise UserError(
            f"The checkpoint{name} was trained with {', '.join(f'{k}={theirs[k]!r}' for k in differ)}"
            + (f" (the default of {', '.join(predates)}: it predates the setting)" if predates else "")
            + f", but the config says {', '.join(f'{k}={ours[k]!r}' for k in differ)}. {fix}"
        )
    # The weights, and the trained weights an EMA checkpoint keeps beside the average (a resume loads them).
    details = state_dict_mismatch(module.state_dict(), checkpoint["state_dict"])
    if not details and "current_model_state" in checkpoint:
        details = state_dict_mismatch(module.state_dict(), checkpoint["current_model_state"])
    if details:
        raise UserError(
            f"The checkpoint{name} holds the weights of {kind or 'another model'}, which do not fit "
            f"{type(module).__name__} ({details}). {fix}"
        )


def check_optimizer_fits(
    checkpoint: Mapping[str, Any], optimizer: str, group_sizes: list[int], path: str | None = None, shapes: list[torch.Size] | None = None
) -> None:
    """Refuse to resume a fit whose config asks for another optimizer class (``optimizer``, a class name) or
    other parameter groups (``group_sizes``, parameters per group) than the checkpoint's optimizer state has:
    torch would load that state and fail at the first step (SGD given Adam's groups: ``KeyError: 'momentum'``).
    With ``shapes`` (the parameters', in group order), a parameter's state (Adam's averages, a momentum) must
    have its parameter's shape too, or torch would fail at the first step with a size mismatch."""
    states = checkpoint.get("optimizer_states") or []
    if not states:
        return
    recorded = checkpoint.get("hyper_parameters", {}).get("optimizer")
    trained = str(recorded.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(recorded, Mapping) else ""
    saved = [len(group["params"]) for group in states[0]["param_groups"]]
    if (trained and trained != optimizer) or saved != group_sizes:
        name = f" '{path}'" if path else ""
        raise UserError(
            f"The checkpoint{name} holds the state of {trained or 'its optimizer'} over {_groups(saved)}, but the config "
            f"asks for {optimizer} over {_groups(group_sizes)}. Resuming a fit continues the optimizer's state, which "
            "only the same optimizer and parameter groups can take: resume with the run's config (config.yaml in its "
            "run folder), leaving `optimizer` and `weight_decay_norm_and_bias` as they were."
        )
    if shapes is None or optimizer == "LBFGS":  # LBFGS keeps one flat state for all parameters
        return
    ids = [p for group in states[0]["param_groups"] for p in group["params"]]
    for position, (index, shape) in enumerate(zip(ids, shapes)):
        for key, value in states[0].get("state", {}).get(index, {}).items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != shape:
                raise damaged_part(
                    f"optimizer state ('{key}' of parameter {position})",
                    f"has shape {tuple(value.shape)}, but the parameter has shape {tuple(shape)}",
                )


def _groups(sizes: list[int]) -> str:
    """``[32, 58]``: "2 parameter groups (32 + 58 parameters)"."""
    plural = "s" if len(sizes) != 1 else ""
    return f"{len(sizes)} parameter group{plural} ({' + '.join(map(str, sizes))} parameters)"


def damaged_part(part: str, detail: str) -> UserError:
    """The error for a checkpoint whose ``part`` (a callback's state, say) cannot be restored: ``detail`` says why."""
    return UserError(
        f"The checkpoint being loaded is damaged or was not written by this program: its {part} {detail}. Resume "
        "from another checkpoint of the run (the best one, or an earlier copy), or start again."
    )

