"""The server's own limits: settings refused when they cannot work, images decoded a few at a
time, and a client that stops mid-upload neither delays the others nor stays forever."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import image_bytes, save_two_task_model

from piggyback import Predictor
from piggyback.serving.app import ServeSettings, create_app
from piggyback.serving.inputs import RequestError
from piggyback.serving.server import running_server
from piggyback.serving.settings import CPU_MAX_WAIT_MS, SHORT_MAX_WAIT_MS


@pytest.fixture(scope="module")
def engine(tiny_weights, tmp_path_factory):
    return Predictor.from_pretrained(
        save_two_task_model(tmp_path_factory.mktemp("limits") / "m", tiny_weights), device="cpu"
    )


def upload(client, data: bytes, **fields):
    return client.post("/v1/predict", files={"image": ("x.png", data, "image/png")}, data=fields)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"max_wait_ms": float("nan")}, "--max-wait-ms must be a finite number >= 0, got nan"),
        ({"max_upload_mb": float("inf")}, "--max-upload-mb must be a finite number"),
        ({"max_upload_mb": 1e-9}, r"--max-upload-mb must be a finite number >= one byte"),
        ({"max_batch_size": 0}, "--max-batch-size must be a finite number >= 1, got 0"),
        ({"decode_threads": 0}, "--decode-threads must be a finite number >= 1"),
        ({"api_key": "clé"}, "printable ASCII"),
        ({"api_key": "two words"}, "printable ASCII"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_option_named(values, words):
    with pytest.raises(ValueError, match=words):
        ServeSettings(**values)


def test_an_empty_api_key_is_no_key():
    assert ServeSettings(api_key="").api_key is None


class InFlight:
    """Counts the calls running at once (`most`); each lasts at least 50 ms."""

    def __init__(self) -> None:
        self.lock, self.running, self.most = threading.Lock(), 0, 0

    def around(self, function):
        def counted(*args, **kwargs):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            time.sleep(0.05)
            with self.lock:
                self.running -= 1
            return function(*args, **kwargs)

        return counted


class Decoding:
    """The engine with another `prepare` (the request threads' decoding): slow, failing or
    counted."""

    def __init__(self, engine, prepare) -> None:
        self.tasks, self.prepare = engine.tasks, prepare
        self.task_description, self.predict = engine.task_description, engine.predict


def test_no_more_images_are_decoded_at_once_than_decode_threads(engine):
    decodes = InFlight()
    counting = Decoding(engine, decodes.around(engine.prepare))
    settings = ServeSettings(max_batch_size=8, max_wait_ms=1, decode_threads=2)
    with TestClient(create_app(counting, settings)) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: upload(client, image_bytes(s), task="digits"), range(8)))
    assert all(a.status_code == 200 for a in answers)
    assert decodes.most == 2  # eight requests at once, two decoding at a time


def test_by_default_a_batch_waits_50_ms_on_cpu_and_5_on_ray_or_a_gpu():
    assert ServeSettings().batch_wait_ms() == CPU_MAX_WAIT_MS == 50
    assert ServeSettings().batch_wait_ms(on_ray=True) == SHORT_MAX_WAIT_MS == 5
    assert ServeSettings().batch_wait_ms(device="cuda:0") == 5
    assert ServeSettings(max_wait_ms=7).batch_wait_ms(on_ray=True) == 7  # as told, anywhere
    assert ServeSettings(max_wait_ms=0).batch_wait_ms() == 0


def test_on_cpu_a_batch_waits_for_others_only_if_it_will_take_every_core(engine):
    from piggyback.serving.app import _least_batch_worth_waiting
    from piggyback.serving.server import ThreadsPerBatch

    threaded = ThreadsPerBatch(engine, small=1, large=2, large_from=8)
    assert str(threaded.device) == "cpu"
    # Below 8 images the batch runs on one thread and the decoding keeps the other core busy.
    assert _least_batch_worth_waiting(threaded, "cpu") == 8
    assert _least_batch_worth_waiting(ThreadsPerBatch(engine, small=2, large=2), "cpu") == 1
    assert _least_batch_worth_waiting(threaded, "cuda:0") == 1  # the CPU only decodes there
    assert _least_batch_worth_waiting(engine, "cpu") == 1  # every batch on every thread


def test_a_batch_that_takes_every_core_waits_for_the_requests_still_being_decoded(engine):
    """The first request's batch waits for five others still decoding. The engine runs every
    batch on every core (a Predictor, not piggyback serve's ThreadsPerBatch, whose batches
    under 8 images would not wait): running it alone meanwhile would only compete with their
    decoding. (A request counts as on its way for its first --max-wait-ms only, and the six
    may arrive far apart on a loaded machine: hence a long wait here.)"""
    others_decoding, lock, calls = threading.Barrier(6, timeout=30), threading.Lock(), [0]

    def prepare(image, tasks, *, keep_picture=True):  # the first waits until 5 others decode
        with lock:
            first, calls[0] = calls[0] == 0, calls[0] + 1
        others_decoding.wait()
        if not first:
            time.sleep(0.01)
        return engine.prepare(image, tasks, keep_picture=keep_picture)

    settings = ServeSettings(decode_threads=6, max_wait_ms=5000)
    app = create_app(Decoding(engine, prepare), settings)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda s: upload(client, image_bytes(s), task="digits"), range(6)))
        batches = client.get("/metrics").json()["batches"]
    assert all(a.status_code == 200 for a in answers)
    assert batches["sizes"] == {"6": 1}, batches  # one batch of all six


def test_an_image_that_fails_to_decode_does_not_hold_the_batch_that_waited_for_it(engine):
    """The batch of a good request waits for one being decoded; when that one fails (after
    0.2 s here), the batch starts, rather than after all of --max-wait-ms (3 s here)."""
    bad_decoding, good_decoded = threading.Event(), threading.Event()

    def prepare(image, tasks, *, keep_picture=True):  # 1x1: fails once the good one waits
        if image.picture.size == (1, 1):
            bad_decoding.set()
            good_decoded.wait(30)
            time.sleep(0.2)
            raise RequestError(400, "invalid_image", "image 0: cannot be decoded")
        bad_decoding.wait(30)  # so that the batch has the bad one to wait for
        prepared = engine.prepare(image, tasks, keep_picture=keep_picture)
        good_decoded.set()
        return prepared

    settings = ServeSettings(max_wait_ms=3000, decode_threads=2)
    bad = image_bytes(0, size=(1, 1))
    app = create_app(Decoding(engine, prepare), settings)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        failing = pool.submit(upload, client, bad, task="digits")
        started = time.monotonic()
        good = upload(client, image_bytes(1), task="digits")
        waited = time.monotonic() - started
    assert good.status_code == 200 and failing.result().status_code == 400
    assert waited < 1.5, f"the good request waited {waited:.1f} s"


def test_a_request_slow_to_decode_holds_only_the_batches_gathered_in_its_first_max_wait(engine):
    """One upload takes 1.5 s to decode; meanwhile another client sends 5 requests one after
    the other. Batches wait up to --max-wait-ms (200 ms here) for a request being decoded, but
    only in its first 200 ms: after that, the other client's requests do not wait for it."""
    slow_started = threading.Event()

    def prepare(image, tasks, *, keep_picture=True):  # 1x1 images take 1.5 s to decode
        if image.picture.size == (1, 1):
            slow_started.set()
            time.sleep(1.5)
        return engine.prepare(image, tasks, keep_picture=keep_picture)

    settings = ServeSettings(max_wait_ms=200, decode_threads=2)
    slow = image_bytes(0, size=(1, 1))
    app = create_app(Decoding(engine, prepare), settings)
    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        upload(client, image_bytes(1), task="digits")  # warm
        slowly = pool.submit(upload, client, slow, task="digits")
        assert slow_started.wait(30)
        started = time.monotonic()
        quick = [upload(client, image_bytes(seed), task="digits") for seed in range(2, 7)]
        took = time.monotonic() - started
        assert slowly.result().status_code == 200
    assert all(answer.status_code == 200 for answer in quick)
    assert took < 0.8, f"5 requests took {took:.2f} s (5 x 200 ms of waiting: 1 s)"


def test_a_client_that_leaves_while_its_image_decodes_costs_no_forward_pass(engine):
    decoding = threading.Event()

    def prepare(image, tasks, *, keep_picture=True):  # slow enough for the client to leave
        decoding.set()
        time.sleep(0.5)
        return engine.prepare(image, tasks, keep_picture=keep_picture)

    app = create_app(Decoding(engine, prepare), ServeSettings(max_wait_ms=1))
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        files = {"image": ("x.png", image_bytes(1), "image/png")}
        request = httpx.Request("POST", url + "/v1/predict", files=files, data={"task": "digits"})
        headers = "".join(f"{name}: {value}\r\n" for name, value in request.headers.items())
        raw = f"POST /v1/predict HTTP/1.1\r\n{headers}\r\n".encode() + request.read()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(raw)
            assert decoding.wait(30)
        time.sleep(1.0)  # its decoding ends; the server finds the client gone
        metrics = httpx.get(url + "/metrics").json()
    assert metrics["batches"]["count"] == 0 and metrics["predictions"] == 0, metrics


def test_large_json_bodies_are_parsed_no_more_at_once_than_decode_threads(engine, monkeypatch):
    from piggyback.serving import inputs

    parses = InFlight()
    monkeypatch.setattr(inputs, "_read_json", parses.around(inputs._read_json))
    large = base64.b64encode(image_bytes(3, (300, 300))).decode()  # over JSON_IN_THREAD_BYTES
    settings = ServeSettings(decode_threads=1, max_wait_ms=1)
    with TestClient(create_app(engine, settings)) as client, ThreadPoolExecutor(4) as pool:
        body = {"image": large, "task": "digits"}
        answers = list(pool.map(lambda _: client.post("/v1/predict", json=body), range(4)))
    assert all(a.status_code == 200 for a in answers)
    assert parses.most == 1  # four large bodies at once, parsed one at a time


def stalled_upload(url: str) -> socket.socket:
    """A connection that sends headers announcing 1000 bytes, 10 of them, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"image": '
    )
    return sock


def test_a_stalled_upload_neither_delays_other_clients_nor_stays_open(engine):
    settings = ServeSettings(max_batch_size=8, max_wait_ms=3000, body_timeout_s=2)
    with running_server(create_app(engine, settings)) as url:
        files = {"image": ("x.png", image_bytes(1), "image/png")}
        httpx.post(url + "/v1/predict", files=files, data={"task": "digits"}, timeout=60)  # warm
        stalled = stalled_upload(url)
        started = time.monotonic()
        response = httpx.post(url + "/v1/predict", files=files, data={"task": "digits"}, timeout=60)
        waited = time.monotonic() - started
        stalled.settimeout(30)
        answer = stalled.recv(4096).decode()
        stalled.close()
    assert response.status_code == 200
    # A lone request is not held for --max-wait-ms (3 s) because another one is uploading.
    assert waited < 1.5, f"the lone request waited {waited:.1f} s"
    assert answer.startswith("HTTP/1.1 408") and "upload_timeout" in answer


def test_the_port_is_bound_on_every_address_of_the_host_but_refuses_until_serving():
    from piggyback.serving.sockets import bound_sockets, url_of

    wanted = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets = bound_sockets("localhost", 0)
    try:
        assert {s.family for s in sockets} == {info[0] for info in wanted}
        address = sockets[0].getsockname()
        with pytest.raises(ConnectionRefusedError):  # bound, not listening: the model loads
            socket.create_connection(address[:2], timeout=5).close()
        assert url_of("localhost", sockets) == f"http://localhost:{address[1]}"
    finally:
        for sock in sockets:
            sock.close()
    everywhere = bound_sockets("", 0)  # "" is every interface, as uvicorn took it
    assert everywhere[0].getsockname()[0] in ("0.0.0.0", "::")
    for sock in everywhere:
        sock.close()


def test_a_port_taken_while_the_model_loads_is_an_error_not_a_silent_server():
    from piggyback.serving.sockets import bound_sockets, close_all, listen_all

    ours = bound_sockets("127.0.0.1", 0)
    port = ours[0].getsockname()[1]
    thief = socket.socket()  # binds beside ours (both allow address reuse) and listens first
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    thief.bind(("127.0.0.1", port))
    thief.listen()
    try:
        with pytest.raises(ValueError, match=r"cannot listen on .*taken while the model loaded"):
            listen_all(ours, "127.0.0.1", port)
    finally:
        thief.close()
        close_all(ours)


def test_port_0_gives_every_address_of_the_host_the_same_port():
    from piggyback.serving.sockets import bound_sockets, close_all

    sockets = bound_sockets("", 0)
    try:
        assert len({sock.getsockname()[1] for sock in sockets}) == 1
    finally:
        close_all(sockets)
