"""The HTTP API over a saved two-task model: answers, batching across requests, metrics, auth."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving_fixtures import TASKS, image_bytes, open_image, save_two_task_model

from piggyback import PiggybackModel, Predictor
from piggyback.inputs import PreparedImage, preprocess_key
from piggyback.predict import eval_transform
from piggyback.serving.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def model_dir(tiny_weights, tmp_path_factory):
    return save_two_task_model(tmp_path_factory.mktemp("serve") / "model", tiny_weights)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Predictor.from_pretrained(model_dir, device="cpu")


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServeSettings(max_batch_size=8, max_wait_ms=20))) as c:
        yield c


def expected_top(model_dir, task: str, data: bytes, k: int) -> list[tuple[str, float]]:
    """The task's top-k computed directly with the model, as `piggyback predict` would."""
    model = PiggybackModel.from_pretrained(model_dir, tasks=[task]).eval()
    model.set_task(task)
    x = eval_transform(model, task)(open_image(data))[None]
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    values, indices = probs.topk(k)
    return [(TASKS[task][i], v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]


def upload(client, data: bytes, **fields):
    return client.post("/v1/predict", files={"image": ("x.png", data, "image/png")}, data=fields)


def test_health_and_task_list_with_classes(client):
    assert client.get("/health").json() == {"status": "ok", "tasks": 2}
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert {name: t["classes"] for name, t in tasks.items()} == TASKS
    assert tasks["digits"]["num_classes"] == 4
    assert tasks["colours"]["metadata"]["preprocess"]["image_size"] == 32


def test_predict_answers_what_the_model_computes_for_the_task(client, model_dir):
    data = image_bytes(3)
    response = upload(client, data, task="digits", top_k="3")
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["task"] == result["requested"] == "digits"
    assert result["routing_confidence"] is None
    found = [(p["label"], p["probability"]) for p in result["predictions"]]
    expected = expected_top(model_dir, "digits", data, 3)
    assert [label for label, _ in found] == [label for label, _ in expected]
    assert [p for _, p in found] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_json_base64_gives_the_same_answer_as_multipart(client):
    data = image_bytes(4)
    multipart = upload(client, data, task="colours").json()
    body = {"image": base64.b64encode(data).decode(), "task": "colours"}
    assert client.post("/v1/predict", json=body).json() == multipart
    data_url = {**body, "image": "data:image/png;base64," + body["image"]}
    assert client.post("/v1/predict", json=data_url).json() == multipart


def test_several_tasks_give_one_result_each_and_auto_says_which_task_answered(client):
    data = image_bytes(5)
    both = upload(client, data, task="colours,digits", top_k="2").json()["results"]
    assert [r["task"] for r in both] == ["colours", "digits"]
    assert all(len(r["predictions"]) == 2 for r in both)
    listed = client.post(
        "/v1/predict",
        json={"image": base64.b64encode(data).decode(), "task": ["colours", "digits"], "top_k": 2},
    )
    assert listed.json()["results"] == both
    (auto,) = upload(client, data, task="auto").json()["results"]
    assert auto["requested"] == "auto" and auto["task"] in TASKS
    assert 0 <= auto["routing_confidence"] <= 1 and auto["routed_by"] == "prototypes"
    chosen = next(r for r in both if r["task"] == auto["task"])
    assert auto["predictions"][:2] == chosen["predictions"]


def test_top_k_is_clipped_to_the_number_of_classes(client):
    (result,) = upload(client, image_bytes(6), task="colours", top_k="50").json()["results"]
    assert len(result["predictions"]) == 3
    assert sum(p["probability"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-5)


def test_mixed_task_batch_equals_each_sample_run_alone(engine):
    images = [open_image(image_bytes(seed)) for seed in range(4)]
    tasks = ["colours", "digits", "colours", "auto"]
    batched = engine.predict(images, tasks, top_k=3)
    alone = [
        engine.predict([image], [task], top_k=3)[0]
        for image, task in zip(images, tasks, strict=True)
    ]
    assert [a.task for a in batched] == [a.task for a in alone]
    for together, single in zip(batched, alone, strict=True):
        assert [c for c, _ in together.top] == [c for c, _ in single.top]
        assert [p for _, p in together.top] == pytest.approx([p for _, p in single.top], abs=1e-5)


def test_concurrent_clients_share_batches_and_metrics_count_them(engine):
    app = create_app(engine, ServeSettings(max_batch_size=8, max_wait_ms=200))
    with TestClient(app) as client:
        payloads = [(image_bytes(seed), ["colours", "digits"][seed % 2]) for seed in range(6)]
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda p: upload(client, p[0], task=p[1]), payloads))
        assert all(r.status_code == 200 for r in responses)
        assert [r.json()["results"][0]["task"] for r in responses] == [t for _, t in payloads]
        upload(client, b"not an image")
        metrics = client.get("/metrics").json()
    assert metrics["requests"]["by_status"] == {"200": 6, "400": 1}
    assert metrics["predict_latency"]["count"] == 6 and metrics["predictions"] == 6
    assert metrics["predict_latency"]["p50_ms"] <= metrics["predict_latency"]["p99_ms"]
    assert sum(int(k) * v for k, v in metrics["batches"]["sizes"].items()) == 6
    assert metrics["batches"]["max_size"] > 1  # requests from different clients shared a batch
    assert {t: m["requests"] for t, m in metrics["tasks"].items()} == {"colours": 3, "digits": 3}


def test_images_reach_the_batch_decoded_and_preprocessed_by_the_request_threads(engine):
    seen = []

    class Spy:  # the engine, recording what each batch receives
        tasks = engine.tasks
        task_description, prepare = engine.task_description, engine.prepare

        def predict(self, images, tasks, *, top_k):
            seen.extend(images)
            return engine.predict(images, tasks, top_k=top_k)

    with TestClient(create_app(Spy(), ServeSettings(max_batch_size=4))) as client:
        data = image_bytes(5)
        answer = upload(client, data, task="digits", top_k="2").json()["results"][0]
        auto = upload(client, data, task="auto").json()["results"][0]
    key = preprocess_key(engine.preprocess("digits"))
    assert isinstance(seen[0], PreparedImage) and set(seen[0].inputs) == {key}
    assert answer["task"] == "digits" and auto["task"] in TASKS
    expected = engine.predict([open_image(data)], ["digits"], top_k=2)[0]
    assert [p["label"] for p in answer["predictions"]] == [c for c, _ in expected.top]


def test_an_engine_without_prepare_gets_decoded_pictures(engine):
    class Plain:  # tasks, descriptions and predict only: what the API needed before prepare
        tasks = engine.tasks
        task_description = engine.task_description

        def predict(self, images, tasks, *, top_k):
            assert all(isinstance(image, Image.Image) for image in images)
            return engine.predict(images, tasks, top_k=top_k)

    with TestClient(create_app(Plain(), ServeSettings(max_batch_size=4))) as client:
        assert upload(client, image_bytes(2), task="digits").status_code == 200
        junk = upload(client, b"not an image", task="digits")
    assert junk.status_code == 400 and junk.json()["error"]["code"] == "invalid_image"


def test_openapi_documents_the_routes_and_both_request_bodies(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/v1/tasks", "/v1/predict", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200


def test_the_page_is_served_at_the_root(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/predict" in page.text


def test_api_key_guards_every_route_but_health_and_reveals_nothing(engine, monkeypatch):
    monkeypatch.setenv("PIGGYBACK_API_KEY", "s3cret")
    settings = ServeSettings.with_env_key(max_batch_size=4)
    assert settings.api_key == "s3cret"
    with TestClient(create_app(engine, settings)) as client:
        assert client.get("/health").status_code == 200
        denied = [
            client.get("/v1/tasks"),
            client.get("/metrics"),
            client.get("/openapi.json"),
            client.get("/docs"),
            client.get("/no-such-route"),
            upload(client, image_bytes(1), task="colours"),
            client.get("/v1/tasks", headers={"Authorization": "Bearer wrong"}),
            client.get("/v1/tasks", headers={"Authorization": "s3cret"}),
            client.get("/v1/tasks", headers={"Authorization": "Basic s3cret"}),
            client.get("/v1/tasks", headers={"Authorization": "Bearers3cret"}),
        ]
        for response in denied:
            assert response.status_code == 401
            assert response.json() == {
                "error": {"code": "unauthorized", "message": "missing or wrong bearer token"}
            }
            assert response.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/tasks", headers=auth).status_code == 200
        lower = {"Authorization": "bearer s3cret"}  # the scheme's case does not matter
        assert client.get("/v1/tasks", headers=lower).status_code == 200
        assert client.head("/health").status_code == 200  # uptime checks probe with HEAD
        head, get = client.head("/"), client.get("/")
        assert head.headers["content-type"] == get.headers["content-type"]
        assert head.headers["content-length"] == get.headers["content-length"]
        wrong_method = client.get("/v1/predict", headers=auth)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        # /health has a GET and a HEAD route: the 405 names both, not the first route's
        assert client.post("/health").headers["allow"] == "GET, HEAD"
        ok = client.post(
            "/v1/predict",
            headers=auth,
            files={"image": ("x.png", image_bytes(1), "image/png")},
            data={"task": "colours"},
        )
        assert ok.status_code == 200 and ok.json()["results"][0]["task"] == "colours"
        assert client.get("/").status_code == 200  # the page shell: static, holds no data
