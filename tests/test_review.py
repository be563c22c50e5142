"""What a person sees: the TensorBoard dashboard (read back from a real server), the test report, predictions."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from cifar_resnet.data.archive import load_cifar100
from conftest import CONFIGS, read_scalars, run_cli, tiny_args, warning_lines

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
    fit = run_cli("fit", "--config", CONFIG, *args, "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "true", cwd=cwd)
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
    run_dir = reviewed.runs / "scratch" / "version_1"
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
    fit_run, test_run = "scratch/version_0", "scratch/version_1"
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
