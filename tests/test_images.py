"""Image decoding (`piggyback.images`): what every path (train, eval, predict, serve) is fed.

Each case is built here: 16-bit grayscale, EXIF-rotated JPEGs, transparency, decompression bombs
and bytes that are no image.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_truncated_jpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image
from test_export import trained_model

from piggyback.data import ImageDataset
from piggyback.errors import DataError, ImageError, ImageTooLargeError
from piggyback.images import BACKGROUND, decode_image, verify_image
from piggyback.predict import predict

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (12, 10), dtype=np.uint8)


def png_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_options)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# -- 16-bit grayscale -----------------------------------------------------------------------


def sixteen_bit(values: np.ndarray, container: str) -> bytes | Image.Image:
    """`values` (uint16) as a 16-bit PNG or big-endian TIFF file, or a 32-bit "I" image."""
    if container == "png":
        return png_bytes(Image.fromarray(values.astype("<u2")))  # mode I;16
    if container == "tiff-big-endian":
        buffer = io.BytesIO()
        Image.fromarray(values.astype(">u2")).save(buffer, "TIFF")  # mode I;16B
        return buffer.getvalue()
    return Image.fromarray(values.astype(np.int32))  # mode I


@pytest.mark.parametrize("container", ["png", "tiff-big-endian", "mode-I"])
def test_sixteen_bit_grayscale_looks_like_its_eight_bit_version(container):
    eight_bit = decode_image(png_bytes(Image.fromarray(GRAY8)))
    as_sixteen = decode_image(sixteen_bit(GRAY8.astype(np.uint16) * 257, container))
    assert np.array_equal(pixels(as_sixteen), pixels(eight_bit))  # not a white image
    # Values between the 8-bit steps are rounded to the nearest one.
    values = RNG.integers(0, 65536, (12, 10), dtype=np.uint16)
    decoded = pixels(decode_image(sixteen_bit(values, container)))
    for channel in range(3):
        assert np.abs(decoded[..., channel] - values / 257).max() <= 0.5


def test_sixteen_bit_conversion_needs_a_few_bytes_per_pixel_not_int64_arrays():
    """A server decodes several uploads at once: 1 GB for a 40-megapixel 16-bit PNG was too much."""
    import tracemalloc

    image = Image.fromarray(RNG.integers(0, 65536, (1000, 2000), dtype=np.uint16))
    tracemalloc.start()  # numpy reports its arrays to tracemalloc
    decode_image(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * 2_000_000, f"{peak / 2_000_000:.1f} bytes per pixel"  # int64 math: 17


# -- EXIF orientation -----------------------------------------------------------------------

# How the stored pixels are turned, for each EXIF orientation, so that applying the tag gives
# the upright picture back (the inverse of what a viewer does).
STORED_AS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_picture() -> Image.Image:
    """48 x 32, four solid quadrants of different colours: every turn or flip shows."""
    array = np.zeros((32, 48, 3), np.uint8)
    array[:16, :24] = (220, 30, 30)
    array[:16, 24:] = (30, 200, 30)
    array[16:, :24] = (30, 30, 220)
    array[16:, 24:] = (240, 240, 240)
    return Image.fromarray(array)


def jpeg_bytes(image: Image.Image, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_exif_rotated_jpeg_decodes_as_the_upright_picture(orientation):
    upright = upright_picture()
    stored = upright.transpose(STORED_AS[orientation])
    decoded = decode_image(jpeg_bytes(stored, orientation))
    expected = decode_image(jpeg_bytes(upright))
    assert decoded.size == expected.size == (48, 32)
    assert np.abs(pixels(decoded) - pixels(expected)).mean() < 2  # JPEG noise only
    # The orientation is used up: decoding the result again turns nothing.
    again = decode_image(decoded)
    assert np.array_equal(pixels(again), pixels(decoded))


# -- transparency ---------------------------------------------------------------------------


def half_transparent(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image whose left half is transparent (storing blue / black / a palette colour) and
    whose right half is opaque, in `mode`; and the RGB pixels expected after compositing."""
    opaque = (200, 40, 40)
    expected = np.zeros((8, 10, 3), int)
    expected[:, :5] = BACKGROUND
    expected[:, 5:] = opaque
    if mode == "RGBA":
        rgba = np.zeros((8, 10, 4), np.uint8)
        rgba[:, :5] = (0, 0, 255, 0)  # blue, fully transparent
        rgba[:, 5:] = (*opaque, 255)
        return Image.fromarray(rgba), expected
    if mode == "LA":
        la = np.zeros((8, 10, 2), np.uint8)
        la[:, 5:] = (90, 255)
        expected[:, 5:] = 90
        return Image.fromarray(la, mode="LA"), expected
    # Palette with a transparent index (PNG tRNS): index 0 is transparent green.
    indices = np.zeros((8, 10), np.uint8)
    indices[:, 5:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 255, 0, *opaque] + [0] * 762)
    image.info["transparency"] = 0
    return image, expected


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_the_background(mode):
    image, expected = half_transparent(mode)
    decoded = decode_image(png_bytes(image, transparency=image.info.get("transparency")))
    assert np.array_equal(pixels(decoded), expected)


def test_partly_transparent_pixels_blend_with_the_background():
    rgba = np.full((4, 4, 4), (0, 0, 0, 128), np.uint8)  # half-transparent black
    decoded = pixels(decode_image(Image.fromarray(rgba)))
    assert np.abs(decoded - 127).max() <= 1


# -- decompression bombs --------------------------------------------------------------------


def png_announcing(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces `width` x `height` pixels (a decompression bomb's)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


def test_images_announcing_more_pixels_than_allowed_are_refused_before_decoding():
    bomb = png_announcing(20_000, 4_000)  # 80 MB of pixels in 74 bytes
    with pytest.raises(ImageTooLargeError, match=r"20000x4000 = 80,000,000 pixels") as caught:
        decode_image(bomb, max_pixels=10**7)
    assert "\n" not in str(caught.value)
    with pytest.raises(ImageTooLargeError):
        verify_image(bomb, max_pixels=10**7)
    with pytest.raises(ImageTooLargeError, match="too large"):  # the default guard too
        decode_image(png_announcing(100_000, 100_000))
    small = png_bytes(Image.fromarray(GRAY8))  # 120 pixels
    with pytest.raises(ImageTooLargeError, match="120 pixels, more than the 100 allowed"):
        decode_image(small, max_pixels=100)
    assert decode_image(small, max_pixels=120).size == (10, 12)
    assert isinstance(ImageTooLargeError("x"), DataError)


@pytest.mark.parametrize("pixel_count", [121, 400])  # Pillow's warning, then its error
def test_pillows_own_bomb_guard_is_reported_as_too_large(monkeypatch, pixel_count):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    side = int(pixel_count**0.5)
    image = png_bytes(Image.new("L", (side, side)))
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_image(image, max_pixels=None)


# -- not images -----------------------------------------------------------------------------


def test_bytes_that_are_no_image_are_refused_with_one_line(tmp_path: Path):
    cases = {
        "garbage": RNG.bytes(300),
        "html": b"<html><body>404 not found</body></html>",
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        with pytest.raises(ImageError, match=rf"{name}\.jpg is not an image") as caught:
            decode_image(tmp_path / f"{name}.jpg")
        assert "\n" not in str(caught.value)
        with pytest.raises(ImageError, match="the image data"):
            decode_image(data)
    with pytest.raises(ImageError, match=r"missing\.png does not exist"):
        decode_image(tmp_path / "missing.png")


def test_a_truncated_image_is_refused_naming_the_problem(tmp_path: Path):
    path = write_truncated_jpeg(tmp_path / "cut.jpg")
    verify_image(path)  # the header is intact ...
    with pytest.raises(ImageError, match=r"cut\.jpg is truncated or corrupted"):
        decode_image(path)  # ... the pixels are not
    with open(path, "rb") as handle, pytest.raises(ImageError, match=r"cut\.jpg"):
        decode_image(handle)


VALID_FILES = [
    png_bytes(Image.fromarray(GRAY8)),
    jpeg_bytes(upright_picture(), orientation=6),
    png_bytes(half_transparent("RGBA")[0]),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, len(VALID_FILES) - 1),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
    keep=st.floats(0.05, 1),
)
def test_damaged_image_files_decode_or_raise_an_image_error(which, edits, keep):
    data = bytearray(VALID_FILES[which])
    for where, value in edits:
        data[int(where * len(data))] = value
    data = bytes(data[: max(1, int(keep * len(data)))])
    try:
        image = decode_image(data, max_pixels=10**6)
    except ImageError:
        return
    assert image.mode == "RGB" and image.width * image.height <= 10**6


# -- every path decodes the same way --------------------------------------------------------


@pytest.fixture
def tricky_and_plain(tmp_path: Path) -> list[tuple[Path, Path]]:
    """Pairs (file needing care, plain 8-bit RGB file of the picture it must decode to)."""
    pairs = []

    def pair(name: str, tricky: bytes, plain: Image.Image) -> None:
        (tmp_path / f"{name}.png").write_bytes(tricky)
        plain.convert("RGB").save(tmp_path / f"{name}_plain.png")
        pairs.append((tmp_path / f"{name}.png", tmp_path / f"{name}_plain.png"))

    gray = RNG.integers(0, 256, (24, 20), dtype=np.uint8)
    pair("gray16", sixteen_bit(gray.astype(np.uint16) * 257, "png"), Image.fromarray(gray))
    upright = upright_picture()
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    pair("rotated", png_bytes(upright.transpose(STORED_AS[6]), exif=exif), upright)
    transparent, expected = half_transparent("RGBA")
    pair("transparent", png_bytes(transparent), Image.fromarray(expected.astype(np.uint8)))
    return pairs


def test_the_dataset_decodes_with_decode_image(tricky_and_plain):
    samples = [(path, i) for i, pair in enumerate(tricky_and_plain) for path in pair]
    dataset = ImageDataset(samples)
    for index in range(0, len(samples), 2):
        tricky, plain = dataset[index][0], dataset[index + 1][0]
        assert np.array_equal(pixels(tricky), pixels(plain)), samples[index][0].name


def test_predict_decodes_with_decode_image(tricky_and_plain):
    model = trained_model()
    paths = [path for pair in tricky_and_plain for path in pair]
    predictions = predict(model, "pets", paths, top_k=3)
    for tricky, plain in zip(predictions[::2], predictions[1::2], strict=True):
        assert dict(tricky.top) == pytest.approx(dict(plain.top), abs=1e-6), tricky.path.name
