"""The options of one server: limits, batching and the API key (`piggyback serve`'s flags),
checked when made, so that a bad value is one clear error before anything starts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["API_KEY_ENV", "CPU_MAX_WAIT_MS", "SHORT_MAX_WAIT_MS", "ServeSettings"]

#: Environment variable read for the bearer token when no --api-key is given.
API_KEY_ENV = "PIGGYBACK_API_KEY"


#: The local server's --max-wait-ms on CPU unless told. Its batcher waits only while requests
#: are being decoded (`DynamicBatcher`'s `pending`), never for a lone request, so this bounds how
#: long a batch waits for a round of decoding, not a delay every request pays. On CPU it must
#: cover a full batch's decoding: the forward pass and the decoding threads share the cores, so
#: starting half a batch while the other half decodes gains nothing, and under load the batches
#: then settle at half size. Measured (`benchmarks/serve_load.py`, 4 Lite0 tasks, 2 cores,
#: 32 clients, --max-batch-size 32; benchmarks/results/serve-cpu-wait5 and serve-cpu): 5 ms:
#: batches split about 26 + 6, 122-137 requests/s, p50 237 ms; 50 ms: batches of 30-32 (and a
#: few of 1), 158-175 requests/s, p50 188-192 ms. In ad-hoc runs 100 or 200 ms: no better.
CPU_MAX_WAIT_MS = 50.0

#: --max-wait-ms unless told on Ray Serve, whose batching knows nothing of requests on their way
#: and waits this long for every batch, lone requests included; and on an accelerator, where
#: decoding on the CPU while the device runs the previous batch is real overlap (not measured:
#: no GPU was lent when the CPU default changed).
SHORT_MAX_WAIT_MS = 5.0


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server (the `piggyback serve` options).

    `max_wait_ms` None: 50 ms for the local server on CPU, 5 on Ray Serve or a GPU (see
    `batch_wait_ms`)."""

    max_batch_size: int = 32
    max_wait_ms: float | None = None
    max_upload_mb: float = 10.0
    max_image_pixels: int = 40_000_000
    default_top_k: int = 5
    api_key: str | None = None
    decode_threads: int | None = None  # images decoded at once; None: one per core
    body_timeout_s: float = 30.0  # longest wait for the next piece of a request body

    def __post_init__(self) -> None:
        if self.api_key == "":  # as with_env_key: an empty key is no key
            object.__setattr__(self, "api_key", None)
        lowest = {  # the least each takes, and how the error says it
            "max_batch_size": (1, "1"),
            "max_wait_ms": (0, "0"),
            "max_image_pixels": (1, "1"),
            "default_top_k": (1, "1"),
            "max_upload_mb": (2**-20, "one byte (2**-20)"),
            "decode_threads": (1, "1"),
            "body_timeout_s": (0.001, "0.001"),
        }
        for name, (low, said) in lowest.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not (math.isfinite(value) and value >= low):  # NaN compares False with anything
                option = "--" + name.replace("_", "-")
                raise ValueError(f"{option} must be a finite number >= {said}, got {value}")
        if self.api_key is not None and not _printable_ascii(self.api_key):
            raise ValueError(
                "the API key must be printable ASCII without spaces: HTTP headers carry it, "
                "and browsers refuse other characters there"
            )

    def batch_wait_ms(self, *, device: str = "cpu", on_ray: bool = False) -> float:
        """How long a batch may wait for more requests: `max_wait_ms`, or the default for where
        the network runs and whose batching gathers the requests (see the constants above)."""
        if self.max_wait_ms is not None:
            return self.max_wait_ms
        if on_ray or not device.startswith("cpu"):
            return SHORT_MAX_WAIT_MS
        return CPU_MAX_WAIT_MS

    @classmethod
    def with_env_key(cls, **values: Any) -> ServeSettings:
        """Settings whose api_key falls back to the PIGGYBACK_API_KEY environment variable."""
        if not values.get("api_key"):
            values["api_key"] = os.environ.get(API_KEY_ENV) or None
        return cls(**values)


def _printable_ascii(text: str) -> bool:
    return bool(text) and all(33 <= ord(char) <= 126 for char in text)
