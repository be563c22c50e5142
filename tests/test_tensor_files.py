"""Damaged and hostile ``torch.save`` files: every way a load fails is named, never a bare traceback.

Random bytes reach torch's unpickler as any exception (IndexError, KeyError, struct.error, ...), so these
tests feed many seeded payloads and every truncation point of a real file, not one example."""

from __future__ import annotations

import io
import os
import random
import sys
import zipfile
from pathlib import Path
from typing import IO, Callable

import pytest
import torch
import torchvision

from cifar_resnet.data.archive import safe_unpickle
from cifar_resnet.data.synthetic import py2_pickle, synthetic_split
from cifar_resnet.errors import UserError
from cifar_resnet.models.resnet18 import load_imagenet_weights, resnet18_for_cifar
from cifar_resnet.checkpointing import read_checkpoint
from cifar_resnet.tensor_files import ForeignFile, UnreadableFile, UnsafeFile, check_torch_zip, load_tensors, not_a_file
from cli_process import CliProcess


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


# --- a checkpoint's zip layout, checked before torch.load -------------------------------------------------


def saved(obj: object) -> bytes:
    """What ``torch.save`` writes for ``obj``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rezipped(good: bytes, replace: dict[str, Callable[[IO[bytes]], None]], compression: int = zipfile.ZIP_STORED) -> bytes:
    """``good`` (a torch zip file) written again, each record named in ``replace`` written by its function instead,
    with ``compression``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(good)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename in replace:
                record_info = zipfile.ZipInfo(info.filename)
                record_info.compress_type = compression
                with target.open(record_info, "w", force_zip64=True) as record:
                    replace[info.filename](record)
            else:
                target.writestr(info, source.read(info))
    return out.getvalue()


def zeros(count: int) -> Callable[[IO[bytes]], None]:
    """Writes ``count`` zero bytes, 64 MiB at a time."""

    def write(record: IO[bytes]) -> None:
        for start in range(0, count, 2**26):
            record.write(bytes(min(2**26, count - start)))

    return write


def test_a_file_torch_save_writes_passes(tmp_path: Path) -> None:
    path = tmp_path / "good.ckpt"
    path.write_bytes(saved({"state_dict": {"w": torch.arange(6.0), "b": torch.ones(2, dtype=torch.bool)}, "x": [1, "a"]}))
    check_torch_zip(path)  # the control
    assert torch.equal(load_tensors(path)["state_dict"]["w"], torch.arange(6.0))


def test_a_compressed_record_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    path = tmp_path / "deflated.ckpt"
    path.write_bytes(rezipped(saved({"w": torch.zeros(1)}), {"archive/data/0": zeros(2**20)}, zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 10_000
    with pytest.raises(ForeignFile, match=r"^its record 'archive/data/0' is compressed, which torch.save never does$"):
        check_torch_zip(path)


def test_a_record_larger_than_its_tensors_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "padded.ckpt"
    path.write_bytes(rezipped(saved({"w": torch.zeros(1)}), {"archive/data/0": zeros(1000)}))
    with pytest.raises(ForeignFile, match=r"^its record 'archive/data/0' holds 1,000 bytes, but its tensors declare 4$"):
        check_torch_zip(path)


def test_records_that_overlap_are_refused(tmp_path: Path) -> None:
    # A second central-directory entry for the tensor record, with no bytes of its own: a zip reader would read the
    # record's bytes twice (a thousand such entries: a thousand times). Python's zipfile writes no zip64 records here.
    good = rezipped(saved({"w": torch.zeros(1000)}), {})
    entry = good.rindex(b"archive/data/0") - 46  # the central-directory entry comes after the record's local header
    name_length, extra_length, comment_length = (int.from_bytes(good[entry + k : entry + k + 2], "little") for k in (28, 30, 32))
    copy = good[entry : entry + 46 + name_length + extra_length + comment_length].replace(b"archive/data/0", b"archive/data/9")
    end = good.index(b"PK\x05\x06")  # the end-of-central-directory record: entry counts, the directory's size
    tail = bytearray(good[end:])
    tail[8:10] = tail[10:12] = (int.from_bytes(tail[8:10], "little") + 1).to_bytes(2, "little")
    tail[12:16] = (int.from_bytes(tail[12:16], "little") + len(copy)).to_bytes(4, "little")
    path = tmp_path / "overlap.ckpt"
    path.write_bytes(good[:end] + copy + bytes(tail))
    assert zipfile.ZipFile(path).getinfo("archive/data/9").header_offset == zipfile.ZipFile(path).getinfo("archive/data/0").header_offset
    with pytest.raises(ForeignFile, match=r"^its records hold [\d,]+ bytes, more than the file's [\d,]+ \(they overlap\)$"):
        check_torch_zip(path)


def test_a_pickle_too_large_for_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.ckpt"
    path.write_bytes(saved({"names": [f"{i}" + "x" * 1000 for i in range(200)]}))
    check_torch_zip(path)  # the control: 200 kB of pickle
    with pytest.raises(ForeignFile, match=r"^its pickle holds [\d,]+ bytes, more than a checkpoint's 100,000 at most$"):
        check_torch_zip(path, max_pickle_bytes=100_000)


class RunsACommand:
    """Pickles as a call of ``os.system('true')`` (harmless, and never made: the file is refused unread)."""

    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def test_every_damaged_checkpoint_zip_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    good = saved({"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3})
    path = tmp_path / "x.ckpt"
    for payload in sum(damaged_payloads(good, count=200).values(), []):
        path.write_bytes(payload)
        try:
            check_torch_zip(path)
        except (UnreadableFile, UnsafeFile):
            pass  # ForeignFile is an UnreadableFile


def read_under_memory_cap(path: str, headroom_mb: str) -> None:
    """``read_checkpoint(path)`` with the address space capped ``headroom_mb`` MB above what the process maps now; the
    error goes to stderr."""
    import resource

    from cifar_resnet.errors import UserError

    mapped_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize:"))
    cap = mapped_kb * 1024 + int(headroom_mb) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        read_checkpoint(path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@pytest.mark.slow
def test_a_decompression_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.ckpt"
    path.write_bytes(rezipped(saved({"state_dict": {"w": torch.zeros(1)}}), {"archive/data/0": zeros(2**29)}, zipfile.ZIP_DEFLATED))
    assert path.stat().st_size < 4 * 2**20  # 512 MiB of zeros, in under 4 MB
    proc = CliProcess([str(path), "256"], tmp_path, target=read_under_memory_cap).finish(timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"Refusing to load checkpoint '{path}': it is damaged or was not written by this program: its record 'archive/data/0' is compressed" in proc.stderr
    assert "MemoryError" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_checkpoint_that_asks_to_run_code_is_refused_by_name(tmp_path: Path) -> None:
    # A protocol-2 pickle that calls os.system('true'), in a torch zip file: refused unread, the global named.
    calls = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    path = tmp_path / "evil.ckpt"
    path.write_bytes(rezipped(saved({"state_dict": {}}), {"archive/data.pkl": lambda record: record.write(calls)}))
    with pytest.raises(UserError, match=rf"^Refusing to load checkpoint '{path}': the file asks to run code \(os\.system\)"):
        read_checkpoint(path)
    path.write_bytes(saved({"state_dict": {}, "x": RunsACommand()}))  # what torch.save writes: posix.system
    with pytest.raises(UserError, match=rf"^Refusing to load checkpoint '{path}': the file asks to run code \({os.system.__module__}\.system\)"):
        read_checkpoint(path)
