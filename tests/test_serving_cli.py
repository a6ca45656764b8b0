"""`piggyback serve` as a user starts it: a real process on 127.0.0.1, stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from serving_fixtures import image_bytes, save_two_task_model
from test_cli import runner

from piggyback.cli import app


def test_bad_options_and_missing_model_are_one_line_errors(tiny_weights, tmp_path):
    model = str(save_two_task_model(tmp_path / "model", tiny_weights))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = str(taken.getsockname()[1])
    for args, words in [
        (["serve", str(tmp_path), "--max-batch-size", "0"], "--max-batch-size must be a finite"),
        (["serve", str(tmp_path), "--max-wait-ms", "nan"], "--max-wait-ms must be a finite"),
        (["serve", model, "--port", "70000"], "--port must be 0-65535, got 70000"),
        (["serve", model, "--host", "bad host!"], "not an address of this machine"),
        (["serve", model, "--port", busy], f"cannot listen on 127.0.0.1:{busy}"),
        (["serve", str(tmp_path), "--port", busy], "not a piggyback model directory"),
        (["serve", str(tmp_path / "missing")], "not a piggyback model directory"),
        (["serve", str(tmp_path), "--ray", "--batch-threads", "2"], "not to --ray replicas"),
        (["serve", str(tmp_path), "--batch-threads", "-1"], "--batch-threads must be >= 1, got -1"),
        (["serve", str(tmp_path), "--threads", "0"], "--threads must be >= 1, got 0"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output
    taken.close()


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health").status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the server did not answer /health within {timeout} s")


def test_serve_command_answers_both_tasks_until_interrupted(tiny_weights, tmp_path):
    model_dir = save_two_task_model(tmp_path / "model", tiny_weights)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIGGYBACK_API_KEY": "k"}
    command = [sys.executable, "-m", "piggyback.cli", "serve", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(
        [
            *command,
            "--threads",
            "1",
            "--batch-threads",
            "1",
            "--device",
            "cpu",
            "--batch-invariant",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process)
        assert httpx.get(url + "/v1/tasks").status_code == 401  # the key came from the env
        for task in ("colours", "digits"):
            response = httpx.post(
                url + "/v1/predict",
                headers={"Authorization": "Bearer k"},
                files={"image": ("x.png", image_bytes(0), "image/png")},
                data={"task": task},
                timeout=60,
            )
            assert response.json()["results"][0]["task"] == task
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"serving 2 task(s) of {model_dir} on http://127.0.0.1:{port}" in output
    assert "(cpu, 1 torch thread(s), batch-invariant; API docs at /docs)" in output
