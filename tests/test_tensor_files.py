"""Damaged and hostile ``torch.save`` files: every way a load fails is named, never a bare traceback.

Random bytes reach torch's unpickler as any exception (IndexError, KeyError, struct.error, ...), so these
tests feed many seeded payloads and every truncation point of a real file, not one example."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
import torch
import torchvision

from cifar_resnet.data.archive import safe_unpickle
from cifar_resnet.data.synthetic import py2_pickle, synthetic_split
from cifar_resnet.errors import UserError
from cifar_resnet.models.resnet18 import load_imagenet_weights, resnet18_for_cifar
from cifar_resnet.checkpointing import read_checkpoint
from cifar_resnet.tensor_files import UnreadableFile, UnsafeFile, load_tensors, not_a_file


def damaged_payloads(good: bytes, count: int = 400) -> dict[str, list[bytes]]:
    """Seeded random byte strings of several lengths, random bit flips of ``good`` and its truncations."""
    rng = random.Random(0)
    noise = [rng.randbytes(rng.choice([1, 2, 3, 8, 64, 4096])) for _ in range(count)]
    flipped = []
    for _ in range(count // 4):
        data = bytearray(good)
        for at in rng.sample(range(len(data)), 8):
            data[at] ^= 1 << rng.randrange(8)
        flipped.append(bytes(data))
    cuts = sorted({int(len(good) * k / 60) for k in range(60)})
    return {"noise": noise, "flipped": flipped, "truncated": [good[:cut] for cut in cuts]}


def test_every_damaged_tensor_file_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}, buffer)
    path = tmp_path / "x.ckpt"
    path.write_bytes(buffer.getvalue())
    assert torch.equal(load_tensors(path)["state_dict"]["w"], torch.arange(6.0).reshape(2, 3))  # the control
    kinds = set()
    for payload in sum(damaged_payloads(buffer.getvalue()).values(), []):
        path.write_bytes(payload)
        try:
            load_tensors(path)
        except UnreadableFile as err:
            kinds.add(str(err).split(":")[0])
        except UnsafeFile:
            pass  # flipped bytes can spell a global's name: refused, which is also safe
    # The seeded payloads reach the unpickler's many failure modes, each turned into UnreadableFile.
    assert {"IndexError", "EOFError", "RuntimeError"} <= kinds, kinds


def test_a_file_without_read_permission_says_so(tmp_path: Path, monkeypatch) -> None:
    # Tests may run as root, who reads any file: the refusal comes from the open torch.load makes.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(UnreadableFile, match="permission denied: Permission denied"):
        load_tensors(tmp_path / "locked.ckpt")


def test_every_damaged_weights_file_names_the_file(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(torchvision.models.resnet18().state_dict(), buffer)
    path = tmp_path / "r18.pth"
    rng = random.Random(1)
    for payload in [rng.randbytes(n) for n in (1, 7, 300, 5000)] + [buffer.getvalue()[: n] for n in (10, 5000, 10**6)]:
        path.write_bytes(payload)
        with pytest.raises(UserError, match=rf"Cannot read weights file '{path}': it is truncated, corrupt"):
            load_imagenet_weights(resnet18_for_cifar(), weights_path=path)


def test_every_damaged_cifar_pickle_is_refused_with_the_source_named() -> None:
    good = py2_pickle(synthetic_split(20, 0, b"x"))
    assert safe_unpickle(good, "'x'")["fine_labels"] == synthetic_split(20, 0, b"x")[b"fine_labels"]  # the control
    payloads = damaged_payloads(good)
    for payload in payloads["noise"] + payloads["truncated"]:
        with pytest.raises(UserError, match=r"^Cannot read 'x'"):
            safe_unpickle(payload, "'x'")
    refused = 0
    for payload in payloads["flipped"]:  # a flip inside the pixel bytes still unpickles (the split's checks follow)
        try:
            assert isinstance(safe_unpickle(payload, "'x'"), dict)
        except UserError as err:
            assert str(err).startswith("Cannot read 'x'")
            refused += 1
    assert refused > 0


def test_a_path_that_is_not_a_file_says_what_it_is(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {tmp_path: "is a folder", Path("/dev/null"): "is not a regular file", fifo: "is not a regular file",
             tmp_path / "missing.ckpt": "not found"}  # fmt: skip
    for path, problem in cases.items():
        assert problem in str(not_a_file(path))
        with pytest.raises(UserError, match=rf"^Checkpoint '{path}' {problem}.*\. Pass a \.ckpt file"):
            read_checkpoint(path)  # a FIFO must not block the read
        with pytest.raises(UserError, match=rf"^Weights file '{path}' {problem}.*resnet18-f37072fd\.pth"):
            load_imagenet_weights(resnet18_for_cifar(), weights_path=path)
    torch.save({"a": 1}, tmp_path / "ok.ckpt")
    assert not_a_file(tmp_path / "ok.ckpt") is None
