"""Reading the user's own image files for ``predict``: any size, mode or bit depth, as CIFAR-like uint8 squares.

Memory: an image over ``SHRINK_ABOVE_PIXELS`` is read a piece of at most ``PIECE_PIXELS`` pixels at a
time, its centred square shrunk early by box averaging: the decoded image is its one full-size copy, so
any image within ``MAX_DECODED_BYTES`` is read in little more than that. A smaller image goes the plain
way (a few full-size copies of at most 2^24 pixels: a few hundred MB at most).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from cifar_resnet.atomic import special_file_kind
from cifar_resnet.errors import UserError

# Decoding an image larger than this (after JPEG's reduced-scale decoding) is refused: it would need
# gigabytes of memory for a 32x32 result. A 200-megapixel phone JPEG decodes at 1/8 scale, well below.
MAX_DECODED_BYTES = 1 << 30
# Images with more pixels (after JPEG's reduced-scale decoding) are cut to their centred square and
# shrunk by a whole factor (box averaging) before anything else, a band of rows at a time.
SHRINK_ABOVE_PIXELS = 1 << 24
# The most pixels read out of the decoded image at once (as floats: 16 MiB).
PIECE_PIXELS = 1 << 22
# Bytes per pixel of Pillow's storage of each mode (RGB and the other 3-band modes take 4).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# The turn that makes an image upright, by its EXIF orientation (as PIL.ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}  # fmt: skip


class NotAnImageFile(OSError):
    """A path that is no regular file (a named pipe, device, socket, folder, or a link to nothing)."""


def printable(name: str) -> str:
    """``name`` safe to print and to write as UTF-8: undecodable bytes as ``\\xNN``, control characters escaped."""
    raw = os.fsencode(name) if any("\udc80" <= c <= "\udcff" for c in name) else None
    text = raw.decode("utf-8", "backslashreplace") if raw is not None else name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the entries of the folder ``path`` (sorted; hidden ones and subfolders skipped).

    A folder's named pipes, devices, sockets and links to nothing are listed too: reading them fails
    with their name (:func:`open_regular`) rather than leaving them out unsaid."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        problem = "is not a regular file (a device, pipe or socket)" if path.exists() else "does not exist"
        raise UserError(f"data.predict_path '{printable(str(path))}' {problem}: give an image file or a folder of images.")
    try:
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
    except OSError as err:
        raise UserError(
            f"Cannot list the folder '{printable(str(path))}' (data.predict_path): {err.strerror or err}. "
            "Give a folder you can read."
        ) from err
    if not files:
        raise UserError(f"The folder '{printable(str(path))}' (data.predict_path) holds no files: put PNG or JPEG images in it.")
    return files


def _kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` (no regular file) is, in words: a pipe named as predict's list names it."""
    return "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else special_file_kind(mode) or "a regular file"


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading; :class:`NotAnImageFile` unless it is a regular file. Never waits on a
    named pipe (opened without blocking, then checked), even one put there after the folder was listed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        try:
            target = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise NotAnImageFile("a symbolic link to a file that does not exist") from err
            raise
        if stat.S_ISREG(target.st_mode):
            raise
        raise NotAnImageFile(_kind(target.st_mode)) from err  # a socket cannot be opened
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotAnImageFile(_kind(mode))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _decoded_bytes(image: Image.Image) -> int:
    """Bytes that decoding ``image`` at its (draft) size takes, in Pillow's storage."""
    return image.width * image.height * _PIXEL_BYTES.get(image.mode, 4)


def _pieces(box: tuple[int, int, int, int], rows_multiple: int = 1) -> Iterator[tuple[int, int, int, int]]:
    """``box`` as pieces of at most ``PIECE_PIXELS`` pixels (or a ``rows_multiple`` of full-width rows), row
    by row: bands of whole rows, split into columns only when one row is longer than a piece."""
    left, top, right, bottom = box
    columns = min(right - left, PIECE_PIXELS)
    rows = max(1, PIECE_PIXELS // (columns * rows_multiple)) * rows_multiple
    for y in range(top, bottom, rows):
        for x in range(left, right, columns):
            yield x, y, min(x + columns, right), min(y + rows, bottom)


def _is_high_bit(image: Image.Image) -> bool:
    """Whether ``image`` is 16-bit, 32-bit integer or float greyscale (Pillow would clip it at 255)."""
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def value_range(image: Image.Image) -> tuple[float, float]:
    """The lowest and highest pixel value of a high-bit greyscale ``image``, read a piece at a time.

    Raises:
        ValueError: Some pixels are NaN or infinite (a float image): no picture to scale.
    """
    low, high, bad = np.inf, -np.inf, 0
    for box in _pieces((0, 0, *image.size)):
        values = np.asarray(image.crop(box))
        if values.dtype.kind == "f":
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
        if not bad:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if bad:
        raise ValueError(
            f"{bad} of its {image.width * image.height} pixels are NaN or infinite, in a float image: "
            "replace them with numbers, or save it as an 8- or 16-bit image"
        )
    return low, high


def to_8bit(image: Image.Image, mode: str, low: float, high: float) -> Image.Image:
    """A greyscale ``image`` (of ``mode``: 16-bit, 32-bit or float; values from ``low`` to ``high``) scaled by
    that real range to 8-bit ``L`` (Pillow would clip it at 255, turning most of the picture white)."""
    values = np.asarray(image, dtype=np.float64)  # the one float copy: the steps below work in place
    if mode == "I" and low >= 0 and high <= 255:
        pass  # 8-bit values held in 32-bit integers
    elif mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        values /= 257  # 16 bits: 65535 -> 255, and an 8-bit image saved as 16 bits (x 257) comes back exactly
    elif mode == "F" and low >= 0 and high <= 1:
        values *= 255
    elif high > low:  # any other range: stretch what is there
        values -= low
        values *= 255 / (high - low)
    else:
        values[:] = 0
    return Image.fromarray(np.clip(np.round(values, out=values), 0, 255, out=values).astype(np.uint8), mode="L")


def shrunk_square(image: Image.Image, size: int) -> Image.Image:
    """The centred square of a large ``image``, shrunk by the largest whole factor that leaves it at least
    ``4 * size`` wide, by box averaging (``Image.reduce``), a band of rows at a time: RGB, or float ``F``
    for a high-bit greyscale image. No full-size copy of the image is made."""
    side = min(image.size)
    factor = max(1, side // (4 * size))
    left, top = (image.width - side) // 2, (image.height - side) // 2
    bands = []
    for box in _pieces((left, top, left + side, top + side), rows_multiple=factor):
        piece = image.crop(box)
        piece = Image.fromarray(np.asarray(piece, np.float32), "F") if _is_high_bit(image) else piece.convert("RGB")
        bands.append(np.asarray(piece.reduce(factor)))
    return Image.fromarray(np.concatenate(bands), "F" if _is_high_bit(image) else "RGB")


def read_image(path: Path, size: int = 32) -> Tensor:
    """One image as uint8 ``(3, size, size)``: upright (EXIF), RGB, centre-cropped to a square and resized.

    Raises:
        NotAnImageFile: ``path`` is a named pipe, device, socket or a link to nothing.
        ValueError: Too large to decode within ``MAX_DECODED_BYTES``; NaN or infinite pixels.
    """
    with warnings.catch_warnings(), open_regular(path) as file:
        # Pillow warns about images over 89 megapixels; the size check below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(file) as image:
            image.draft("RGB", (4 * size, 4 * size))  # JPEGs decode at a reduced scale: much faster for photos
            needed = _decoded_bytes(image)
            if needed > MAX_DECODED_BYTES:
                raise ValueError(
                    f"{image.width}x{image.height} pixels would take {needed / 2**30:.1f} GiB to decode, over "
                    f"the {MAX_DECODED_BYTES / 2**30:.0f} GiB limit; shrink it below 100 megapixels"
                )
            image.load()
            mode, turn = image.mode, _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation, 1))
            low, high = value_range(image) if _is_high_bit(image) else (0, 255)
            if image.width * image.height > SHRINK_ABOVE_PIXELS:
                image = shrunk_square(image, size)  # then turned upright: the same centred square
            elif turn is not None:
                image, turn = image.transpose(turn), None
            image = (to_8bit(image, mode, low, high) if _is_high_bit(image) else image).convert("RGB")
            if turn is not None:
                image = image.transpose(turn)
            square = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)


def read_images(path: Path, size: int = 32) -> tuple[list[str], Tensor]:
    """Every image at ``path`` (a file or a folder) as uint8 ``(N, 3, size, size)``, with its printable name.

    Any file that is not an image Pillow can read (PNG, JPEG and the other common formats), that is
    too large to decode or has NaN pixels, or that is no regular file (a named pipe, a device...), makes
    a :class:`UserError` that lists every such file.
    """
    files = image_files(path)
    images, bad = [], []
    for file in files:
        name = printable(str(file))
        try:
            images.append(read_image(file, size))
        except UnidentifiedImageError:
            bad.append(f"'{name}' (not an image)")
        except NotAnImageFile as err:
            bad.append(f"'{name}' (not a regular file: {err})")
        except Image.DecompressionBombError as err:
            bad.append(f"'{name}' (too large: {err})")
        except (OSError, ValueError, SyntaxError) as err:
            bad.append(f"'{name}' (unreadable: {err})")
    if bad:
        raise UserError(
            f"Cannot predict on {len(bad)} of the {len(files)} files at data.predict_path '{printable(str(path))}': "
            f"{'; '.join(bad)}. Remove, fix or convert them: predict reads PNG and JPEG images (and other formats Pillow opens)."
        )
    names = [printable(file.name if path.is_dir() else str(file)) for file in files]
    return names, torch.stack(images)
