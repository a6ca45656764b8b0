"""Bad input to /v1/predict: a 4xx with a JSON error saying what was wrong, the server keeps
answering, and memory does not grow (decompression bombs are refused before decoding)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import resource
import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serving_fixtures import image_bytes, save_two_task_model

from piggyback import Predictor
from piggyback.serving.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def engine(tiny_weights, tmp_path_factory):
    return Predictor.from_pretrained(
        save_two_task_model(tmp_path_factory.mktemp("bad") / "m", tiny_weights)
    )


@pytest.fixture(scope="module")
def client(engine):
    settings = ServeSettings(max_batch_size=4, max_wait_ms=1, max_upload_mb=1.0)
    with TestClient(create_app(engine, settings)) as c:
        yield c


def png_announcing(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + (chunk(b"IEND", b""))
    )


def huge_real_png() -> bytes:
    """A complete, valid 20000 x 20000 PNG (1-bit, all black: ~50 kB on disk, 1.2 GB as RGB)."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, data: bytes, name: str = "x.png", **fields):
    return client.post("/v1/predict", files={"image": (name, data, "image/png")}, data=fields)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def json_post(body: dict):
    return lambda client: client.post("/v1/predict", json=body)


def nested_json(depth: int):
    body = b'{"image": ' + b"[" * depth + b"]" * depth + b"}"
    return lambda c: c.post(
        "/v1/predict", content=body, headers={"content-type": "application/json"}
    )


GOOD = image_bytes(1)
JPEG = image_bytes(2, (64, 64), "JPEG")
HUGE = huge_real_png()

#: name -> (send(client) -> response, expected status, expected error code, words in the message)
CASES = {
    "text_file": (lambda c: post(c, b"hello, not an image"), 400, "invalid_image", "not an image"),
    "truncated_png": (lambda c: post(c, GOOD[: len(GOOD) // 2]), 400, "invalid_image", "truncated"),
    "truncated_jpeg": (
        lambda c: post(c, JPEG[: len(JPEG) // 2]),
        400,
        "invalid_image",
        "truncated",
    ),
    "empty_file": (lambda c: post(c, b""), 400, "empty_image", "empty"),
    "empty_json_body": (
        lambda c: c.post("/v1/predict", headers={"content-type": "application/json"}),
        400,
        "empty_body",
        "empty",
    ),
    "no_body_no_type": (
        lambda c: c.post("/v1/predict"),
        415,
        "unsupported_media_type",
        "multipart",
    ),
    "form_without_image": (
        lambda c: c.post("/v1/predict", files={"other": ("a", b"x")}),
        400,
        "missing_image",
        "'image'",
    ),
    "multipart_cut_short": (
        lambda c: c.post(
            "/v1/predict",
            content=b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"\r\n" + GOOD[:100],
            headers={"content-type": "multipart/form-data; boundary=x"},
        ),
        400,
        "missing_image",
        "cut short",
    ),
    "bomb_header": (
        lambda c: post(c, png_announcing(200_000, 200_000)),
        413,
        "image_too_large",
        "",
    ),
    "huge_20000_square": (lambda c: post(c, HUGE), 413, "image_too_large", "pixels"),
    "unknown_task": (lambda c: post(c, GOOD, task="cats"), 400, "unknown_task", "'cats'"),
    "too_many_predictions": (
        lambda c: c.post(
            "/v1/predict", json={"images": [b64(GOOD)] * 3, "task": ["colours", "digits"]}
        ),
        413,
        "too_many_predictions",
        "3 image(s) x 2 task(s)",
    ),
    "upload_over_limit": (
        lambda c: post(c, GOOD + b"\0" * (2 * 2**20)),
        413,
        "upload_too_large",
        "1 MB",
    ),
    "streamed_over_limit": (
        lambda c: c.post(
            "/v1/predict",
            content=iter([b'{"image": "'] + [b"A" * 2**16] * 40 + [b'"}']),
            headers={"content-type": "application/json"},
        ),
        413,
        "upload_too_large",
        "--max-upload-mb",
    ),
    "bad_base64": (lambda c: c.post("/v1/predict", json={"image": "@@@"}), 400, "bad_base64", ""),
    "bad_json": (
        lambda c: c.post(
            "/v1/predict", content=b"{oops", headers={"content-type": "application/json"}
        ),
        400,
        "bad_json",
        "JSON",
    ),
    "bad_task": (
        lambda c: c.post("/v1/predict", json={"image": b64(GOOD), "task": 5}),
        400,
        "bad_task",
        "task name",
    ),
    "bad_top_k": (lambda c: post(c, GOOD, top_k="-2"), 400, "bad_top_k", "-2"),
    "wrong_method": (lambda c: c.get("/v1/predict"), 405, "method_not_allowed", ""),
    "task_zero": (json_post({"image": b64(GOOD), "task": 0}), 400, "bad_task", "task name"),
    "images_not_a_list": (json_post({"image": b64(GOOD), "images": 5}), 400, "bad_json", "list"),
    "data_url_without_comma": (
        json_post({"image": "data:image/png;base64"}),
        400,
        "empty_image",
        "0 bytes",
    ),
    "top_k_infinity": (
        lambda c: c.post(
            "/v1/predict",
            content=f'{{"image": "{b64(GOOD)}", "top_k": Infinity}}'.encode(),
            headers={"content-type": "application/json"},
        ),
        400,
        "bad_json",
        "Infinity",
    ),
    "deeply_nested_json": (nested_json(100_000), 400, "bad_json", "nested"),
    # over JSON_IN_THREAD_BYTES: parsed in a worker thread, whose stack must hold as much
    "deeply_nested_json_parsed_in_a_thread": (nested_json(300_000), 400, "bad_json", "nested"),
    "task_sent_as_a_file": (
        lambda c: c.post(
            "/v1/predict", files={"image": ("x.png", GOOD), "task": ("t.txt", b"colours")}
        ),
        400,
        "bad_task",
        "text field",
    ),
    "very_long_task_name": (
        lambda c: post(c, GOOD, task="a" * 200_000),
        400,
        "unknown_task",
        "(cut)",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(client, name):
    send, status, code, words = CASES[name]
    response = send(client)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    assert "Traceback" not in response.text and len(response.text) < 2000
    after = post(client, GOOD, task="colours")
    assert after.status_code == 200 and after.json()["results"][0]["task"] == "colours"


def rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_memory_does_not_grow_over_many_bad_requests(client):
    def round_of_bad_requests() -> None:
        for name in sorted(CASES):
            CASES[name][0](client)

    for _ in range(3):  # warm-up: allocator pools, caches, lazily imported modules
        round_of_bad_requests()
    gc.collect()
    before, peak_before = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(15):  # 15 rounds of every case above
        round_of_bad_requests()
    gc.collect()
    grown = rss_bytes() - before
    peak_grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 20 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MB"
    # No request ever decoded the 20000 x 20000 image (1.2 GB as RGB): the peak barely moved.
    assert peak_grown_kb < 100 * 1024, f"peak memory grew by {peak_grown_kb / 1024:.1f} MB"
    assert post(client, GOOD, task="digits").status_code == 200


def test_base64_as_tools_print_it_is_accepted_wrapped_url_safe_or_unpadded(client):
    wrapped = "\n".join(b64(GOOD)[i : i + 76] for i in range(0, len(b64(GOOD)), 76))
    url_safe = base64.urlsafe_b64encode(GOOD).decode().rstrip("=")
    expected = post(client, GOOD, task="colours").json()["results"]
    for text in (wrapped, url_safe, f"data:image/png;base64,{wrapped}"):
        response = client.post("/v1/predict", json={"image": text, "task": "colours"})
        assert response.status_code == 200, response.text
        assert response.json()["results"] == expected


def test_a_large_json_body_is_parsed_off_the_event_loop(client, monkeypatch):
    from piggyback.serving import inputs

    where, parse = [], inputs._read_json

    def spy(body: bytes):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:  # no loop runs in this thread
            where.append("worker thread")
        return parse(body)

    monkeypatch.setattr(inputs, "_read_json", spy)
    large = image_bytes(3, (300, 300))
    assert len(b64(large)) > inputs.JSON_IN_THREAD_BYTES > len(b64(GOOD))
    for image in (GOOD, large):
        response = client.post("/v1/predict", json={"image": b64(image), "task": "colours"})
        assert response.status_code == 200, response.text
    assert where == ["event loop", "worker thread"]


def test_json_tasks_may_be_comma_separated_and_a_null_image_defers_to_images(client):
    body = {"image": None, "images": [b64(GOOD)], "task": "colours,digits"}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    assert [r["task"] for r in response.json()["results"]] == ["colours", "digits"]


def test_a_client_leaving_mid_upload_is_a_request_error_not_a_logged_traceback():
    import asyncio

    from starlette.requests import Request

    from piggyback.serving.inputs import RequestError, read_predict_request

    async def leave() -> dict:
        return {"type": "http.disconnect"}

    for kind in ("application/json", "multipart/form-data; boundary=x"):
        headers = [(b"content-type", kind.encode())]
        request = Request({"type": "http", "method": "POST", "headers": headers}, leave)
        with pytest.raises(RequestError, match="left mid-upload"):
            asyncio.run(read_predict_request(request))
