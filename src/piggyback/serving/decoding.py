"""Decoding and preprocessing a request's images, in worker threads, a few at a time.

The one thread that runs the network should do nothing else (it is what every request waits
for), so uploads are decoded and preprocessed in anyio's worker threads, and the queue holds
network inputs, not full-size photos: measured on 2 cores (load test, 5 interleaved runs, with
and without), 5-8% more requests/s, batched or one at a time. At most `limiter` images are
decoded at once: a 16-bit or transparent image near the pixel limit takes up to ~1 GB while it is
decoded, and anyio's 40 threads at once would exhaust memory (6 such uploads: 5.5 GB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from anyio import CapacityLimiter, to_thread

from piggyback.inputs import PreparedImage
from piggyback.runtime import release_free_memory
from piggyback.serving.inputs import PredictInput, decode_upload

if TYPE_CHECKING:
    from piggyback.serving.app import Engine

__all__ = ["RELEASE_AFTER_PIXELS", "decoded_images", "prepared_upload"]

#: Images over this many pixels hand the memory their decoding took back to the system.
RELEASE_AFTER_PIXELS = 8_000_000


async def decoded_images(
    data: PredictInput, engine: Engine, max_pixels: int, limiter: CapacityLimiter
) -> list[Any]:
    """The request's images, each decoded and preprocessed for its tasks in a worker thread."""
    return [
        await to_thread.run_sync(
            prepared_upload, engine, raw, i, data.tasks, max_pixels, limiter=limiter
        )
        for i, raw in enumerate(data.images)
    ]


def prepared_upload(
    engine: Engine, raw: bytes, index: int, tasks: list[str], max_pixels: int
) -> Any:
    """The upload decoded and preprocessed for its tasks, without the full-size picture. An
    engine without `prepare` gets the decoded picture."""
    picture = decode_upload(raw, index, max_pixels=max_pixels)
    prepare = getattr(engine, "prepare", None)
    if prepare is None:
        return picture
    pixels = picture.width * picture.height
    # Already decoded (oriented RGB): as a PreparedImage, prepare does not decode a second copy.
    prepared = prepare(PreparedImage(picture), tasks, keep_picture=False)
    del picture
    if pixels > RELEASE_AFTER_PIXELS:  # rare: give back what decoding it took (see runtime)
        release_free_memory()
    return prepared
