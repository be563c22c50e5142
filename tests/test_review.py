"""What a person sees: the TensorBoard dashboard (read back from a real server), the test report, predictions."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_resnet.data.archive import load_cifar100
from cli_process import CliProcess
from conftest import CONFIGS, ROOT, read_scalars, run_cli, tiny_args, warning_lines

CONFIG = str(CONFIGS / "scratch.yaml")


@dataclass
class ReviewedRun:
    """A 2-epoch fit, then a test of its best checkpoint, in one runs folder."""

    cwd: Path
    runs: Path
    args: list[str]
    best: Path
    fit: subprocess.CompletedProcess
    test: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def reviewed(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ReviewedRun:
    cwd = tmp_path_factory.mktemp("review")
    args = tiny_args(cifar_dir, cwd / "runs")
    # The installed command itself, so that warnings printed while it imports are seen too.
    fit = run_cli("fit", "--config", CONFIG, *args, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "true", cwd=cwd, installed=True)
    found = re.search(r"^Best val/top1: ([0-9.]+), checkpoint: (.+)$", fit.stdout, re.MULTILINE)
    assert found, f"no summary line in:\n{fit.stdout[-2000:]}"
    best = cwd / found.group(2)
    test = run_cli("test", "--config", CONFIG, *args, "--ckpt_path", str(best), cwd=cwd)
    return ReviewedRun(cwd, cwd / "runs", args, best, fit, test)


def test_fit_ends_with_the_best_score_and_checkpoint_and_no_warnings(reviewed: ReviewedRun) -> None:
    score = float(re.search(r"^Best val/top1: ([0-9.]+)", reviewed.fit.stdout, re.MULTILINE).group(1))
    assert reviewed.best.is_file() and reviewed.best.parent == reviewed.runs / "scratch" / "version_0" / "checkpoints"
    val_top1 = [value for _, value in read_scalars(reviewed.runs / "scratch" / "version_0")["val/top1"]]
    assert score == pytest.approx(max(val_top1), abs=1e-4)
    assert "img/s=" in reviewed.fit.stdout, "the progress bar shows images per second"
    for proc in (reviewed.fit, reviewed.test):
        assert not warning_lines(proc.stderr), warning_lines(proc.stderr)
        assert "litlogger" not in proc.stdout + proc.stderr


def test_test_report_table_and_json_match_the_logged_metrics(reviewed: ReviewedRun) -> None:
    run_dir = reviewed.runs / "scratch" / "version_0-test"
    report = json.loads((run_dir / "test_report.json").read_text())
    logged = read_scalars(run_dir)
    for name in ("test/top1", "test/top5", "test/loss"):
        assert report["metrics"][name] == pytest.approx(logged[name][-1][1], rel=1e-6)
        assert re.search(rf"^  {name}\s+{report['metrics'][name]:.4f}$", reviewed.test.stdout, re.MULTILINE)
    assert report["checkpoint"] == str(reviewed.best)
    classes = report["classes"]
    assert len(classes) == 100 and sum(c["images"] for c in classes.values()) == report["images"] == 200
    # The per-class accuracies, weighted by images, give back top-1.
    correct = sum(c["accuracy"] * c["images"] for c in classes.values())
    assert correct / report["images"] == pytest.approx(report["metrics"]["test/top1"], abs=1e-6)
    assert len(report["superclasses"]) == 20
    best = report["best_classes"][0]
    assert classes[best]["accuracy"] == max(c["accuracy"] for c in classes.values() if c["images"])
    assert re.search(rf"^  best classes\s+{best} ", reviewed.test.stdout, re.MULTILINE)
    assert "worst classes" in reviewed.test.stdout and str(run_dir / "test_report.json") in reviewed.test.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TensorBoardServer:
    """The real ``tensorboard`` program on a free local port."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        command = [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--reload_interval", "0"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def url(self, path: str, **query: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}" + (f"?{urlencode(query)}" if query else "")

    def get(self, path: str, body: dict | None = None, **query: str) -> bytes:
        request = urllib.request.Request(self.url(path, **query))
        if body is not None:  # the hparams plugin takes its request as a JSON body
            request = urllib.request.Request(request.full_url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def wait_until_loaded(self, run: str, timeout: float = 90) -> None:
        """Poll until the server answers and has read ``run``'s scalars."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"tensorboard exited {self.process.returncode}: {self.process.stderr.read()[-2000:]}")
            try:
                if run in json.loads(self.get("/data/plugin/scalars/tags")):
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        pytest.fail(f"tensorboard did not serve run {run!r} within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def test_tensorboard_serves_scalars_figures_and_hparams(reviewed: ReviewedRun) -> None:
    fit_run, test_run = "scratch/version_0", "scratch/version_0-test"
    server = TensorBoardServer(reviewed.runs)
    try:
        server.wait_until_loaded(test_run)
        scalars = json.loads(server.get("/data/plugin/scalars/tags"))
        for stage in ("train", "val"):
            for name in ("loss" + ("_epoch" if stage == "train" else ""), "top1", "top5"):
                assert f"{stage}/{name}" in scalars[fit_run]
        for name in ("train/lr", "train/epoch_time", "train/images_per_sec"):
            assert name in scalars[fit_run]
        assert {"test/loss", "test/top1", "test/top5"} <= set(scalars[test_run])

        images = json.loads(server.get("/data/plugin/images/tags"))
        assert {"val/confusion_matrix", "val/class_accuracy"} <= set(images[fit_run])
        assert {"test/confusion_matrix", "test/class_accuracy", "test/superclass_accuracy", "test/misclassified"} <= set(
            images[test_run]
        )
        entries = json.loads(server.get("/data/plugin/images/images", run=fit_run, tag="val/confusion_matrix", sample="0"))
        assert len(entries) == 2, "one confusion matrix per validation epoch (2 epochs)"
        png = server.get("/data/plugin/images/individualImage?" + entries[-1]["query"])
        picture = Image.open(io.BytesIO(png))
        assert picture.format == "PNG" and picture.width >= 1000 and picture.height >= 1000
        # The picture is not blank: the matrix is drawn in colour on white.
        assert np.asarray(picture.convert("L")).std() > 10

        experiment = json.loads(server.get("/data/plugin/hparams/experiment", body={"experimentName": ""}))
        hparams = {info["name"] for info in experiment["hparamInfos"]}
        assert {"dropout", "batch_size", "val_size", "optimizer/class_path", "optimizer/init_args/lr"} <= hparams
        metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
        assert {"val/top1_best", "val/top1", "val/loss", "train/top1", "test/top1", "test/top5", "test/loss"} <= metrics
        request = {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                   "colParams": [{"metric": {"tag": "val/top1_best"}}, {"metric": {"tag": "test/top1"}},
                                 {"hparam": "dropout"}, {"hparam": "optimizer/init_args/lr"}],
                   "startIndex": 0, "sliceSize": 10}  # fmt: skip
        groups = json.loads(server.get("/data/plugin/hparams/session_groups", body=request))["sessionGroups"]
        sessions = {group["name"]: group for group in groups}
        assert set(sessions) == {fit_run, test_run}, "one HPARAMS row per run: the fit and the test"
        for group in groups:
            assert group["hparams"]["dropout"] == 0.3 and group["hparams"]["optimizer/init_args/lr"] == 1e-3
        values = {(name, m["name"]["tag"]): m["value"] for name, g in sessions.items() for m in g["metricValues"]}
        val_top1 = json.loads(server.get("/data/plugin/scalars/scalars", run=fit_run, tag="val/top1"))
        assert values[(fit_run, "val/top1_best")] == pytest.approx(max(v for _, _, v in val_top1))
        report = json.loads((reviewed.runs / test_run / "test_report.json").read_text())
        assert values[(test_run, "test/top1")] == pytest.approx(report["metrics"]["test/top1"])
    finally:
        server.stop()
    assert server.process.returncode is not None


def write_photos(folder: Path) -> list[str]:
    """PNG and JPEG files of several sizes and modes, as a user's own pictures would be."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    specs = [("wide.jpg", (48, 200, 3)), ("tall.png", (300, 40, 3)), ("big.jpeg", (720, 960, 3)),
             ("grey.png", (32, 32)), ("alpha.PNG", (64, 64, 4)), ("tiny.jpg", (8, 8, 3))]  # fmt: skip
    for name, shape in specs:
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    return sorted(name for name, _ in specs)


def test_predict_on_a_folder_of_images_writes_the_top5_csv(reviewed: ReviewedRun, cifar_dir: Path) -> None:
    names = write_photos(reviewed.cwd / "photos")
    output = reviewed.cwd / "predictions.csv"
    proc = run_cli(
        "predict", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best),
        "--data.predict_path", str(reviewed.cwd / "photos"), "--prediction.output", str(output), cwd=reviewed.cwd,
    )  # fmt: skip
    assert f"to {output}" in proc.stdout
    with output.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows] == names
    class_names = set(load_cifar100(cifar_dir / "cifar-100-python").class_names)
    for row in rows:
        classes = [row[f"class_{k}"] for k in range(1, 6)]
        probs = [float(row[f"prob_{k}"]) for k in range(1, 6)]
        assert set(classes) <= class_names and len(set(classes)) == 5
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert re.search(rf"^{re.escape(row['file'])}\s+{classes[0]} \({probs[0]:.2f}\)$", proc.stdout, re.MULTILINE)


def test_predict_without_a_path_uses_the_test_split_and_the_run_folder(reviewed: ReviewedRun) -> None:
    proc = run_cli("predict", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best), cwd=reviewed.cwd)
    path = Path(re.search(r"images \(first 10 shown\) to (.+)$", proc.stdout, re.MULTILINE).group(1))
    assert path.name == "predictions.csv" and path.parent.parent == reviewed.runs / "scratch"
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows] == [f"test[{i}]" for i in range(200)]


def test_predict_lists_every_file_it_cannot_read(reviewed: ReviewedRun, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_photos(folder)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "cut.jpg").write_bytes((folder / "big.jpeg").read_bytes()[:200])
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden files are skipped, not errors
    args = ["predict", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best)]
    proc = run_cli(*args, "--data.predict_path", str(folder), cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "notes.txt' (not an image)" in proc.stderr and "cut.jpg' (unreadable" in proc.stderr
    assert ".DS_Store" not in proc.stderr and "big.jpeg" not in proc.stderr

    (tmp_path / "empty").mkdir()
    proc = run_cli(*args, "--data.predict_path", str(tmp_path / "empty"), cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "holds no files" in proc.stderr


def test_superclass_accuracy_counts_exact_and_same_superclass_answers() -> None:
    import torch

    from cifar_resnet.figures import per_class_accuracy, superclass_accuracy

    # 4 classes in 2 superclasses {0, 1} and {2, 3}; rows are true classes.
    confusion = torch.tensor([[3, 1, 0, 0], [2, 2, 0, 0], [0, 0, 4, 0], [1, 0, 1, 2]])
    exact, coarse = superclass_accuracy(confusion, torch.tensor([0, 0, 1, 1]), 2)
    assert exact.tolist() == pytest.approx([5 / 8, 6 / 8])
    assert coarse.tolist() == pytest.approx([8 / 8, 7 / 8])
    assert per_class_accuracy(confusion).tolist() == pytest.approx([3 / 4, 2 / 4, 1.0, 2 / 4])


def test_the_progress_bar_shows_numbers_in_a_fixed_format(reviewed: ReviewedRun) -> None:
    shown = re.findall(r"(img/s|loss|val/top1)=([^,\]\s]+)", reviewed.fit.stdout)
    assert {name for name, _ in shown} == {"img/s", "loss", "val/top1"}
    for name, value in shown:
        assert re.fullmatch(r"\d+" if name == "img/s" else r"\d+\.\d{4}", value), f"{name}={value}"


def test_a_checkpoint_is_enough_to_predict_without_the_archive(reviewed: ReviewedRun, cifar_dir: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(reviewed.best, map_location="cpu", weights_only=True)
    stored = checkpoint["CIFAR100DataModule"]
    archive = load_cifar100(cifar_dir / "cifar-100-python")
    assert stored["class_names"] == archive.class_names and stored["superclass_names"] == archive.superclass_names
    assert stored["fine_to_coarse"] == archive.fine_to_coarse().tolist()
    transform = stored["transform"]
    assert list(transform["mean"]) == [0.5071, 0.4865, 0.4409] and list(transform["std"]) == [0.2673, 0.2564, 0.2762]
    assert transform["output_size"] == 32
    names = write_photos(tmp_path / "photos")
    empty = tmp_path / "no-data"
    # The recipe says `download: true`: predicting on files must not fetch (or look for) the archive.
    args = [*reviewed.args, "--data.data_dir", str(empty), "--data.download", "true", "--ckpt_path", str(reviewed.best)]
    proc = run_cli("predict", "--config", CONFIG, *args, "--data.predict_path", str(tmp_path / "photos"), "--prediction.output",
                   str(tmp_path / "p.csv"), cwd=tmp_path)  # fmt: skip
    assert not empty.exists() and "Traceback" not in proc.stderr
    with (tmp_path / "p.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["file"] for row in rows] == names
    assert all({row[f"class_{k}"] for k in range(1, 6)} <= set(archive.class_names) for row in rows)


def predictions(reviewed: ReviewedRun, path: Path, cwd: Path, expect_ok: bool = True) -> tuple[list[dict], subprocess.CompletedProcess]:
    """Run predict on ``path``; the CSV's rows and the process."""
    output = cwd / "p.csv"
    proc = run_cli("predict", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best), "--data.predict_path",
                   str(path), "--prediction.output", str(output), cwd=cwd, expect_ok=expect_ok)  # fmt: skip
    if not expect_ok:
        return [], proc
    with output.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file)), proc


def test_predict_reads_16_bit_and_float_images_by_their_real_range(reviewed: ReviewedRun, tmp_path: Path) -> None:
    folder = tmp_path / "depths"
    folder.mkdir()
    grey = np.random.default_rng(3).integers(0, 256, (40, 40)).astype(np.uint8)
    Image.fromarray(grey).save(folder / "a_8bit.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "b_16bit.png")  # the same picture, 16 bits deep
    Image.fromarray(grey.astype(np.float32) / 255, mode="F").save(folder / "c_float.tiff")
    assert Image.open(folder / "b_16bit.png").mode.startswith("I")
    rows, _ = predictions(reviewed, folder, tmp_path)
    assert [row["file"] for row in rows] == ["a_8bit.png", "b_16bit.png", "c_float.tiff"]
    answers = [[(row[f"class_{k}"], row[f"prob_{k}"]) for k in range(1, 6)] for row in rows]
    assert answers[0] == answers[1] == answers[2]
    from cifar_resnet.data.images import read_image

    assert torch.equal(read_image(folder / "a_8bit.png"), read_image(folder / "b_16bit.png"))
    assert read_image(folder / "b_16bit.png").float().mean() < 200, "not clipped to white"


def test_predict_writes_awkward_file_names_safely(reviewed: ReviewedRun, tmp_path: Path) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    picture = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    picture.save(folder / "=HYPERLINK(1).png")
    picture.save(folder / "line\nbreak.png")
    picture.save(os.fsdecode(bytes(folder) + b"/latin-\xe9.png"), format="PNG")
    rows, proc = predictions(reviewed, folder, tmp_path)
    assert sorted(row["file"] for row in rows) == ["'=HYPERLINK(1).png", "latin-\\xe9.png", "line\\nbreak.png"]
    assert "line\nbreak" not in proc.stdout and "line\\nbreak.png" in proc.stdout
    assert re.search(r"^Wrote the top-5 classes of 3 images to ", proc.stdout, re.MULTILINE)

    rows, proc = predictions(reviewed, folder / "=HYPERLINK(1).png", tmp_path)
    assert len(rows) == 1 and "classes of 1 image to" in proc.stdout


def test_predict_refuses_an_image_too_large_to_decode(reviewed: ReviewedRun, tmp_path: Path) -> None:
    # A PNG whose header claims 30000 x 30000 pixels (2.7 GB as RGB): a few bytes on disk.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "huge.png").write_bytes(png)
    existing = tmp_path / "p.csv"
    existing.write_text("file,class_1,prob_1\nearlier.png,apple,0.9000\n")  # an earlier run's predictions
    _, proc = predictions(reviewed, tmp_path / "huge.png", tmp_path, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "huge.png' (too large" in proc.stderr
    assert existing.read_text() == "file,class_1,prob_1\nearlier.png,apple,0.9000\n", "a failed predict leaves the earlier CSV alone"


def test_the_csv_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    from cifar_resnet.errors import UserError
    from cifar_resnet.predict import write_csv_atomically

    path = tmp_path / "p.csv"
    write_csv_atomically(path, [["file", "class_1"], ["a.png", "-1"]])
    assert path.read_bytes() == b"file,class_1\r\na.png,-1\r\n"

    def rows_that_fail():
        yield ["file", "class_1"]
        raise OSError(28, "No space left on device")

    # A full disk is the one-paragraph error that names the file and keeps the earlier one (as for checkpoints).
    with pytest.raises(UserError, match=r"Cannot write '.*p\.csv': the disk is full"):
        write_csv_atomically(path, rows_that_fail())
    assert path.read_bytes() == b"file,class_1\r\na.png,-1\r\n" and [p.name for p in tmp_path.iterdir()] == ["p.csv"]


def test_validate_prints_the_report_on_its_own_lines_after_the_bar(reviewed: ReviewedRun) -> None:
    proc = run_cli("validate", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best),
                   "--trainer.enable_progress_bar", "true", "--trainer.limit_val_batches", "1", cwd=reviewed.cwd)  # fmt: skip
    report_line = re.search(r"^Validation report: 100 images, checkpoint (.+)$", proc.stdout, re.MULTILINE)
    assert report_line and report_line.group(1) == str(reviewed.best)
    assert re.search(r"^  val/top1\s+\d\.\d{4}$", proc.stdout, re.MULTILINE)
    assert "┃" not in proc.stdout and "Validate metric" not in proc.stdout, "Lightning's own table is not printed too"
    saved = Path(re.search(r"^Saved to (.+val_report\.json)$", proc.stdout, re.MULTILINE).group(1))
    printed = float(re.search(r"^  val/top1\s+(\S+)$", proc.stdout, re.MULTILINE).group(1))
    assert json.loads(saved.read_text())["metrics"]["val/top1"] == pytest.approx(printed, abs=1e-4)


def export_command(*args: str) -> None:
    """What the ``cifar-resnet-export`` command runs (here in a process forked as tests/cli_process.py says)."""
    from cifar_resnet.export import main

    main(list(args))


def test_export_to_onnx_matches_pytorch(reviewed: ReviewedRun, tmp_path: Path) -> None:
    import onnxruntime

    from cifar_resnet.export import network_of

    output = tmp_path / "model.onnx"
    proc = CliProcess([str(reviewed.best), str(output)], tmp_path, target=export_command).finish(timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(Path(f"{output}.json").read_text())
    checkpoint = torch.load(reviewed.best, map_location="cpu", weights_only=True)
    assert info["class_names"] == checkpoint["CIFAR100DataModule"]["class_names"] and len(info["class_names"]) == 100
    assert info["input"]["shape"] == ["batch", 3, 32, 32]
    images = torch.rand(5, 3, 32, 32)
    mean, std = torch.tensor(info["input"]["mean"]).view(1, 3, 1, 1), torch.tensor(info["input"]["std"]).view(1, 3, 1, 1)
    inputs = (images - mean) / std
    with torch.no_grad():
        expected = network_of(checkpoint)(inputs).numpy()
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": inputs.numpy()})
    # Tolerance: float32 kernels of two runtimes differ in summation order, ~1e-5 on logits of size ~10.
    assert logits.shape == (5, 100) and np.abs(logits - expected).max() < 1e-3
    assert (logits.argmax(1) == expected.argmax(1)).all()


def test_the_exported_json_lists_every_step_predict_takes(reviewed: ReviewedRun, tmp_path: Path) -> None:
    """Following the JSON's steps with Pillow, numpy and onnxruntime alone gives predict's probabilities, on
    images that need each step: an alpha channel, a palette, an EXIF turn of a non-square JPEG, 16 bits."""
    import onnxruntime
    from PIL import ImageOps

    photos, rng = tmp_path / "photos", np.random.default_rng(0)
    photos.mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA").save(photos / "a_alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P").save(photos / "b_palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turned 90 degrees
    Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)).save(photos / "c_turned.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16)).save(photos / "d_16bit.png")
    output = tmp_path / "predictions.csv"
    run_cli("predict", "--config", CONFIG, *reviewed.args, "--ckpt_path", str(reviewed.best), "--data.predict_path", str(photos),
            "--prediction.output", str(output), cwd=tmp_path)  # fmt: skip
    proc = CliProcess([str(reviewed.best), str(tmp_path / "model.onnx")], tmp_path, target=export_command).finish(timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "model.onnx.json").read_text())
    steps = " ".join(info["input"]["preprocessing"])
    for named in ("draft", "exif_transpose", "/257", "convert('RGB')", "alpha channel is dropped", "palette", "LANCZOS", "`mean`"):
        assert named in steps
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    mean, std = np.array(info["input"]["mean"], np.float32), np.array(info["input"]["std"], np.float32)
    with output.open() as file:
        rows = {row["file"]: row for row in csv.DictReader(file)}
    for path in sorted(photos.iterdir()):
        with Image.open(path) as image:  # the JSON's steps, one by one
            image.draft("RGB", (128, 128))
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16"):
                image = Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8), "L")
            image = ImageOps.fit(image.convert("RGB"), (32, 32), method=Image.Resampling.LANCZOS)
        x = ((np.asarray(image, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
        (logits,) = session.run(["logits"], {"images": x})
        if info["tta"]:
            logits = (logits + session.run(["logits"], {"images": x[..., ::-1].copy()})[0]) / 2
        probs = np.exp(logits[0] - logits[0].max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        row = rows[path.name]
        assert [float(row[f"prob_{k}"]) for k in range(1, 6)] == pytest.approx(probs[top].tolist(), abs=2e-4), path.name
        assert row["class_1"] == info["class_names"][top[0]], path.name


def test_the_command_introduces_itself() -> None:
    proc = run_cli("--help", cwd=ROOT)
    assert "Lightning Trainer command line tool" not in proc.stdout and "trains and evaluates ResNets on CIFAR-100" in proc.stdout
    for subcommand in ("fit", "validate", "test", "predict"):
        assert re.search(rf"^    {subcommand}\s+[A-Z].*", proc.stdout, re.MULTILINE)
    assert re.fullmatch(r"cifar-resnet \d+\.\d+\.\d+\S*\n", run_cli("--version", cwd=ROOT).stdout)
    fit_help = " ".join(run_cli("fit", "--help", cwd=ROOT).stdout.split())
    assert "--model.help ScratchResNet" in fit_help and "README.md" in fit_help
    assert "'last' for the newest" in fit_help and "cannot run code" in fit_help
