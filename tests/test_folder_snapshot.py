"""A run folder put back as it was after a failed resume (src/cifar_resnet/folder_snapshot.py); end to end in
test_errors.py (a resume refused for its optimizer, a full disk)."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_resnet.folder_snapshot import FolderSnapshot


def test_restore_removes_what_was_added_and_puts_back_what_was_rewritten(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"epoch 3")
    (run / "hparams.yaml").write_text("lr: 0.1\n")
    (run / "events.out.tfevents.1.host.1.0").write_bytes(b"old log")
    os.mkfifo(run / ".lock")  # never read (reading a FIFO waits forever)
    snapshot = FolderSnapshot.take(run)
    assert not snapshot.wrote_checkpoint()

    (run / "hparams.yaml").write_text("lr: 0.5\n")
    (run / "events.out.tfevents.2.host.2.0").write_bytes(b"new log")
    (run / "figures" / "val").mkdir(parents=True)
    (run / "figures" / "val" / "step_9.png").write_bytes(b"png")
    assert sorted(snapshot.restore()) == ["events.out.tfevents.2.host.2.0", "figures", "figures/val", "figures/val/step_9.png", "hparams.yaml"]
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "events.out.tfevents.1.host.1.0", "hparams.yaml"]
    assert (run / "hparams.yaml").read_text() == "lr: 0.1\n" and (run / "checkpoints" / "last.ckpt").read_bytes() == b"epoch 3"


def test_a_checkpoint_written_since_the_snapshot_is_seen(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    snapshot = FolderSnapshot.take(tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"epoch 4")
    assert snapshot.wrote_checkpoint()
    assert not FolderSnapshot.take(tmp_path / "missing").wrote_checkpoint()
