"""Compose docs/review.png from a test run's TensorBoard images: the confusion matrix on the left, the
superclass accuracy and the misclassified images on the right.

    python docs/make_review_png.py runs/finetune/version_1 docs/review.png
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def last_image(run_dir: Path, tag: str) -> Image.Image:
    """The last image logged under ``tag`` in the run's event files."""
    for events in sorted(run_dir.glob("events.out.tfevents.*"), reverse=True):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if tag in acc.Tags()["images"]:
            return Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB")
    raise SystemExit(f"no image {tag!r} in {run_dir}")


def compose(run_dir: Path, output: Path, height: int = 1100) -> None:
    """Write the three test panels side by side to ``output``."""
    def scaled(image: Image.Image, h: int) -> Image.Image:
        return image.resize((round(image.width * h / image.height), h), Image.Resampling.LANCZOS)

    matrix = scaled(last_image(run_dir, "test/confusion_matrix"), height)
    superclasses = last_image(run_dir, "test/superclass_accuracy")
    wrong = last_image(run_dir, "test/misclassified")
    width = max(superclasses.width, wrong.width)
    right_height = superclasses.height * width // superclasses.width + wrong.height * width // wrong.width
    superclasses = scaled(superclasses, superclasses.height * height // right_height)
    wrong = scaled(wrong, height - superclasses.height)
    canvas = Image.new("RGB", (matrix.width + max(superclasses.width, wrong.width), height), "white")
    canvas.paste(matrix, (0, 0))
    canvas.paste(superclasses, (matrix.width, 0))
    canvas.paste(wrong, (matrix.width, superclasses.height))
    canvas.quantize(colors=256).save(output, optimize=True)  # a palette keeps the file small


if __name__ == "__main__":
    compose(Path(sys.argv[1]), Path(sys.argv[2]))
