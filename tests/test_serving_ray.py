"""Scale-out on Ray Serve: a local Ray instance, two replicas each holding the backbone and both
tasks, Ray Serve's HTTP proxy in front, the same FastAPI app behind it, correct answers."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve
from serving_fixtures import image_bytes, open_image, save_two_task_model

from piggyback import Predictor
from piggyback.serving.app import ServeSettings

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve_url():
    """Ray Serve's HTTP proxy on a free port of a local Ray instance; its URL."""
    # Two CPUs for the whole instance, one torch thread per process: this machine has 2 cores.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}},
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_two_tasks_like_the_model(ray_serve_url, tiny_weights, tmp_path):
    url = ray_serve_url
    from piggyback.serving.ray_app import build

    model_dir = save_two_task_model(tmp_path / "model", tiny_weights)
    settings = ServeSettings(max_batch_size=8, max_wait_ms=20)
    serve.run(build(model_dir, settings, replicas=2, threads=1, num_cpus=0.5), route_prefix="/")
    status = serve.status().applications["default"].deployments["piggyback"]
    assert status.replica_states == {"RUNNING": 2}

    requests = [(seed, ["colours", "digits"][seed % 2]) for seed in range(8)]

    def ask(request: tuple[int, str]) -> dict:
        seed, task = request
        response = httpx.post(
            url + "/v1/predict",
            files={"image": ("x.png", image_bytes(seed), "image/png")},
            data={"task": task, "top_k": "2"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()["results"][0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, requests))
    engine = Predictor.from_pretrained(model_dir, device="cpu")
    for (seed, task), answer in zip(requests, answers, strict=True):
        (expected,) = engine.predict([open_image(image_bytes(seed))], [task], top_k=2)
        assert answer["task"] == task
        assert [p["label"] for p in answer["predictions"]] == [label for label, _ in expected.top]
        assert [p["probability"] for p in answer["predictions"]] == pytest.approx(
            [p for _, p in expected.top], abs=1e-5
        )
    assert httpx.get(url + "/health").json() == {"status": "ok", "tasks": 2}
    bad = httpx.post(url + "/v1/predict", files={"image": ("x.png", b"nope", "image/png")})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_image"
