"""Decoding an image file into the 8-bit RGB picture a network is fed: one function for all.

Training, evaluation, prediction and serving must see the same pixels for the same file, or a task
is evaluated (or served) on images prepared differently from those it learned on. `decode_image`
is that one place. It fixes what a plain `Image.open(...).convert("RGB")` gets wrong:

- 16-bit grayscale (PNG / TIFF, Pillow modes I;16*, I): Pillow's conversion clips 0..65535 to
  0..255, so nearly every pixel becomes white; here values are scaled by 255/65535.
- EXIF orientation: phones store pixels sideways and a tag saying how to turn them; applied.
- Transparency (RGBA, LA, PA, palette or colour-key transparency): dropping the alpha channel
  shows whatever colour the transparent pixels happen to store; they are composited on
  `BACKGROUND` (white: what viewers and browsers show, and the paper of sketches and logos).
- Other modes (CMYK, YCbCr, 1-bit, palette, ...) go through Pillow's conversion to RGB.

Untrusted input is refused with one-line `DataError`s: a file that is no image, truncated or
corrupted (`ImageError`), or whose header announces more than `max_pixels` pixels
(`ImageTooLargeError`, checked before any pixel is decoded: a tiny file can announce
gigapixels). Pillow's own decompression-bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`, its warning
included) raises the same `ImageTooLargeError`.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from piggyback.errors import ImageError, ImageTooLargeError

__all__ = ["BACKGROUND", "DEFAULT_MAX_PIXELS", "ImageSource", "decode_image", "verify_image"]

ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image

#: What transparent pixels are composited on (white).
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: Pixel limit by default: Pillow's own warning threshold (about 89.5 megapixels, e.g.
#: 9459 x 9459; 268 MB as 8-bit RGB), far above any classification input.
DEFAULT_MAX_PIXELS: int = 89_478_485

# Pillow modes holding one 16-bit channel ("I" is how older Pillows and some plugins hold them).
_SIXTEEN_BIT_GRAY = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Pillow's readers raise many exception types on malformed input (OSError for unknown or
# truncated data, but also SyntaxError, ValueError, EOFError, struct.error, IndexError, ... from
# individual plugins). The bytes are untrusted, so every exception raised while Pillow parses or
# decodes them is a property of the input, reported as an ImageError; only our own code runs
# outside these guarded calls.
_DECODER_FAILURE = Exception


def decode_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """`source` as a new 8-bit RGB image, oriented, with transparency composited on white.

    `source`: a path, the file's bytes, a binary file object (read from its current position),
    or an already opened PIL image (left unchanged; only the size guard and the conversion apply).
    `max_pixels`: refuse images with more pixels than this (None: only Pillow's own limit).
    `draft_size`: a JPEG may be decoded by libjpeg at the smallest 1/2, 1/4 or 1/8 scale that
    keeps both sides >= `draft_size`: several times cheaper for photos much larger than the
    network input, and invisible after the resize that follows.
    Raises `ImageTooLargeError` or `ImageError` (both `DataError`s) naming the source.
    """
    if isinstance(source, Image.Image):
        name = _name_of(source)
        _check_pixels(source.size, max_pixels, name)
        return _guarded(lambda: _to_rgb(source), name)
    with _opened(source, max_pixels) as (image, name):
        return _guarded(lambda: _to_rgb(_drafted(image, draft_size)), name)


def verify_image(source: ImageSource, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise what `decode_image` would for a missing, unknown, corrupted or too large image.

    Cheap: parses the header and runs Pillow's `verify()` (PNG checksums), without decoding the
    pixels, so a truncated JPEG can pass here and still fail in `decode_image`.
    """
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, _name_of(source))
        return
    with _opened(source, max_pixels) as (image, name):
        _guarded(image.verify, name)


@contextmanager
def _opened(
    source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None
) -> Iterator[tuple[Image.Image, str]]:
    """The lazily opened image (header parsed, size checked) and a name to report it by."""
    name = _name_of(source)
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    try:
        # Pillow warns (DecompressionBombWarning) above MAX_IMAGE_PIXELS and raises above twice
        # that; the warning is made an error too, so a suspected bomb is never decoded. (The
        # filter is process-wide while it is set; all it does is turn this one warning into an
        # exception that is reported as ImageTooLargeError.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError as error:
        raise ImageError(f"{name} does not exist") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{name} is refused as too large: {error}") from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(f"{name} is not an image file Pillow can read") from error
    except _DECODER_FAILURE as error:
        raise ImageError(f"{name} cannot be read: {_describe(error)}") from error
    with image:
        _check_pixels(image.size, max_pixels, name)
        yield image, name


def _guarded(decode, name: str):
    """`decode()`, with whatever Pillow raises on bad pixel data reported as an ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # GIF frames, ...
            return decode()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLargeError(f"{name} is refused as too large: {error}") from error
    except _DECODER_FAILURE as error:
        raise ImageError(
            f"{name} is truncated or corrupted ({_describe(error)}): re-export or re-download it"
        ) from error


def _drafted(image: Image.Image, draft_size: int | None) -> Image.Image:
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    return image


def _check_pixels(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than the "
            f"{max_pixels:,} allowed: downscale it first"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: 16-bit gray scaled, transparency composited, EXIF orientation applied."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if image.mode in _SIXTEEN_BIT_GRAY:
        rgb = _sixteen_bit_to_gray(image).convert("RGB")
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgb = _composited(image.convert("RGBA"))
    else:
        rgb = image.convert("RGB")  # a copy even when already RGB: never the caller's object
    if orientation != 1:
        # exif_transpose reads the tag from the image's EXIF, which the conversion dropped for
        # some formats (TIFF keeps it in its own tags): give the converted image the tag found.
        rgb.getexif()[ExifTags.Base.Orientation] = orientation
        ImageOps.exif_transpose(rgb, in_place=True)
    return rgb


def _sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    """0..65535 -> 0..255, rounded: an 8-bit image saved as 16-bit (v * 257) comes back exact.

    By hand because Pillow's own I;16 -> L conversion clips instead of scaling.
    """
    values = np.asarray(image)
    if values.dtype.kind != "u" or values.dtype.itemsize != 2:  # mode "I": any 32-bit integer
        values = np.clip(values, 0, 65535)
    # A table lookup: ~4 bytes per pixel where int64 arithmetic took 17 (tracemalloc, measured).
    return Image.fromarray(_SIXTEEN_TO_EIGHT[values], mode="L")


_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)


def _composited(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _name_of(source: object) -> str:
    """How an image is named in messages: its path, its file's name, or what it is."""
    if isinstance(source, str | os.PathLike):
        return str(Path(source))
    if isinstance(source, bytes | bytearray | memoryview):
        return f"the image data ({len(source):,} bytes)"
    filename = getattr(source, "filename", None) or getattr(source, "name", None)
    if isinstance(filename, str | os.PathLike) and str(filename):
        return str(filename)
    return "the image" if isinstance(source, Image.Image) else "the image stream"


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
