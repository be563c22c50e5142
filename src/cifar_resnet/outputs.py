"""Which existing files an output may replace: only an earlier output of the same kind, never the command's
input, a checkpoint, a file of another kind, or what a link leads to when that is no file."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cifar_resnet.atomic import output_file_problem, replaceable_target
from cifar_resnet.errors import UserError

HEAD_BYTES = 64  # enough of a file's start to tell the kinds below apart


def _is_predictions(path: Path, head: bytes) -> bool:
    return head.startswith(b"file,class_1,prob_1")  # PredictionWriter's header


def _is_json(path: Path, head: bytes) -> bool:
    return head.lstrip()[:1] == b"{"


def _is_onnx(path: Path, head: bytes) -> bool:
    return head[:1] == b"\x08"  # an ONNX ModelProto starts with its field 1, ir_version (a varint)


def _is_exported_program(path: Path, head: bytes) -> bool:
    """A ``torch.export.save`` archive (a zip, as a checkpoint is, but one that holds an ``archive_format`` record)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "archive_format" for name in archive.namelist())


# Each kind of output the program writes: what to call an existing one, what to call the file to give, and how
# to recognize one.
KINDS: dict[str, tuple[str, str, Callable[[Path, bytes], bool]]] = {
    "predictions": ("a CSV of predictions from cifar-resnet predict", "a CSV file to write, such as predictions.csv", _is_predictions),
    "report": ("a JSON file", "a JSON file to write, such as report.json", _is_json),
    "onnx": ("an ONNX model", "an ONNX file to write, such as model.onnx", _is_onnx),
    "torch.export": ("a torch.export program", "a file to write, such as model.pt2", _is_exported_program),
}


def check_output(path: Path, kind: str, option: str, inputs: Iterable[str | Path | None] = (), hint: str = "") -> Path:
    """Refuse, as a :class:`UserError` naming ``option``, to write output of ``kind`` (a key of :data:`KINDS`) at
    ``path`` when that would replace one of the command's ``inputs``, a file of another kind (a checkpoint, an
    image, a config) or what is no regular file; returns the file that writing ``path`` replaces.

    An empty file, or an earlier output of the same kind, may be replaced. ``hint`` ends the message about a
    path that is no file (", or ...").
    """
    description, wanted, looks_right = KINDS[kind]
    problem = output_file_problem(path)
    if problem:
        raise UserError(f"{option} '{path}' {problem}: give the path of {wanted}.")
    target = replaceable_target(path, hint)
    if not target.is_file():
        return target
    for given in inputs:
        if given is not None and Path(given).exists() and os.path.samefile(given, target):
            raise UserError(f"{option} '{path}' is the file this command reads ('{given}'): writing it would destroy it. Choose another file name.")
    try:
        with open(target, "rb") as file:
            head = file.read(HEAD_BYTES)
        same_kind = not head or looks_right(target, head)
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{option} '{path}' cannot be read to check what it holds ({err}): choose another file name.") from None
    if not same_kind:
        raise UserError(
            f"{option} '{path}' already exists and is not {description}{_what_it_is(head)}: it is left as it is. "
            "Choose another file name, or delete the file first if you no longer need it."
        )
    return target


def _what_it_is(head: bytes) -> str:
    """A few words on what a file is that is not the expected output, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return " (it is a zip file, as checkpoints and weights are)"
    return ""
