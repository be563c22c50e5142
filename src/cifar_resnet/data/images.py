"""Reading the user's own image files for ``predict``: any size, mode or bit depth, as CIFAR-like uint8 squares."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from cifar_resnet.errors import UserError

# Decoding an image larger than this (after JPEG's reduced-scale decoding) is refused: it would need
# gigabytes of memory for a 32x32 result. A 200-megapixel phone JPEG decodes at 1/8 scale, well below.
MAX_DECODED_BYTES = 1 << 30


def printable(name: str) -> str:
    """``name`` safe to print and to write as UTF-8: undecodable bytes as ``\\xNN``, control characters escaped."""
    raw = os.fsencode(name) if any("\udc80" <= c <= "\udcff" for c in name) else None
    text = raw.decode("utf-8", "backslashreplace") if raw is not None else name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the files in the folder ``path`` (sorted; hidden files and subfolders skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        problem = "is not a regular file (a device, pipe or socket)" if path.exists() else "does not exist"
        raise UserError(f"data.predict_path '{printable(str(path))}' {problem}: give an image file or a folder of images.")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"The folder '{printable(str(path))}' (data.predict_path) holds no files: put PNG or JPEG images in it.")
    return files


def _decoded_bytes(image: Image.Image) -> int:
    """Bytes that decoding ``image`` at its (draft) size takes."""
    per_band = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}.get(image.mode, 1)
    return image.width * image.height * len(image.getbands()) * per_band


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale images scaled by their real range to 8-bit ``L`` (Pillow would clip
    them at 255, turning most of the picture white); other modes are returned as they are."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "I" and values.min() >= 0 and values.max() <= 255:
        pass  # 8-bit values held in 32-bit integers
    elif image.mode.startswith("I;16") or (image.mode == "I" and values.min() >= 0 and values.max() <= 65535):
        values = values / 257  # 16 bits: 65535 -> 255, and an 8-bit image saved as 16 bits (x 257) comes back exactly
    elif image.mode == "F" and values.min() >= 0 and values.max() <= 1:
        values = values * 255
    else:  # any other range: stretch what is there
        low, high = values.min(), values.max()
        values = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")


def read_image(path: Path, size: int = 32) -> Tensor:
    """One image as uint8 ``(3, size, size)``: upright (EXIF), RGB, centre-cropped to a square and resized."""
    with warnings.catch_warnings():
        # Pillow warns about images over 89 megapixels; the size check below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.draft("RGB", (4 * size, 4 * size))  # JPEGs decode at a reduced scale: much faster for photos
            needed = _decoded_bytes(image)
            if needed > MAX_DECODED_BYTES:
                raise ValueError(
                    f"{image.width}x{image.height} pixels would take {needed / 2**30:.1f} GiB to decode; "
                    "shrink it below 100 megapixels"
                )
            image = ImageOps.exif_transpose(image)
            image = to_8bit(image).convert("RGB")
            square = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)


def read_images(path: Path, size: int = 32) -> tuple[list[str], Tensor]:
    """Every image at ``path`` (a file or a folder) as uint8 ``(N, 3, size, size)``, with its printable name.

    Any file that is not an image Pillow can read (PNG, JPEG and the other common formats), or that is
    too large to decode, makes a :class:`UserError` that lists every such file.
    """
    files = image_files(path)
    images, bad = [], []
    for file in files:
        name = printable(str(file))
        try:
            images.append(read_image(file, size))
        except UnidentifiedImageError:
            bad.append(f"'{name}' (not an image)")
        except Image.DecompressionBombError as err:
            bad.append(f"'{name}' (too large: {err})")
        except (OSError, ValueError, SyntaxError) as err:
            bad.append(f"'{name}' (unreadable: {err})")
    if bad:
        raise UserError(
            f"Cannot predict on {len(bad)} of the {len(files)} files at data.predict_path '{printable(str(path))}': "
            f"{'; '.join(bad)}. Remove or convert them: predict reads PNG and JPEG images (and other formats Pillow opens)."
        )
    names = [printable(file.name if path.is_dir() else str(file)) for file in files]
    return names, torch.stack(images)
