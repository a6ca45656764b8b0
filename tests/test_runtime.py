"""`runtime.tune_allocator`: freed activations stay in the process, in every thread."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import textwrap

import pytest
from serving_fixtures import save_two_task_model

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="tune_allocator sets glibc's malloc (glibc only)"
)

# Forward passes in a worker thread, as a server's inference thread runs them, with activations
# of 96 MiB (12 x 32 x 256 x 256 floats), more than the 64 MiB arenas glibc gives threads;
# prints each pass's page faults.
_FAULTS_PER_PASS = textwrap.dedent(
    """
    import json, resource, sys, threading
    import torch
    from piggyback.runtime import tune_allocator

    if sys.argv[1] == "tuned":
        assert tune_allocator()
    torch.set_num_threads(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3, padding=1)
    )
    images = torch.rand(12, 3, 256, 256)
    faults = []

    def passes():
        with torch.inference_mode():
            for _ in range(8):
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                net(images).sum()
                faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

    thread = threading.Thread(target=passes)
    thread.start()
    thread.join()
    print(json.dumps(faults))
    """
)


def _faults_after_the_first_pass(mode: str) -> float:
    command = [sys.executable, "-c", _FAULTS_PER_PASS, mode]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return statistics.median(json.loads(run.stdout)[1:])


def test_a_worker_thread_reuses_freed_activations_without_page_faults_once_tuned():
    # A 96 MiB block is 24576 pages: untuned, every pass faults its activations in again (glibc
    # unmaps them on free); tuned, the memory freed by one pass serves the next (now and then
    # the heap still grows by one block in a pass: hence the median of 7 passes).
    assert _faults_after_the_first_pass("untuned") > 10_000
    assert _faults_after_the_first_pass("tuned") < 1_000


# A 3000 x 3000 RGBA PNG decoded and preprocessed as the server does, allocator tuned as the
# server's; prints resident memory (MB) before and after.
_RSS_AROUND_A_LARGE_UPLOAD = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np
    from PIL import Image
    from piggyback.runtime import tune_allocator

    assert tune_allocator()
    import piggyback.serving.decoding as decoding

    if sys.argv[2] == "never":
        decoding.RELEASE_AFTER_PIXELS = 10**12

    def rss():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
        return int(line.split()[1]) // 1024

    pixels = np.random.default_rng(0).integers(0, 256, (3000, 3000, 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG", compress_level=1)
    data = buffer.getvalue()
    del pixels, buffer
    from piggyback import Predictor

    engine = Predictor.from_pretrained(sys.argv[1], device="cpu")
    before = rss()
    decoding.prepared_upload(engine, data, 0, engine.tasks[:1], 40_000_000)
    print(json.dumps([before, rss()]))
    """
)


def test_a_server_gives_back_what_decoding_a_large_upload_took(tiny_weights, tmp_path):
    model = save_two_task_model(tmp_path / "m", tiny_weights)
    grown = {}
    for mode in ("never", "released"):
        command = [sys.executable, "-c", _RSS_AROUND_A_LARGE_UPLOAD, str(model), mode]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        before, after = json.loads(run.stdout)
        grown[mode] = after - before
    # Decoding takes ~150 MB (RGBA, then RGB, 9 megapixels); kept by the tuned allocator unless
    # given back.
    assert grown["never"] > 100 and grown["released"] < 30, grown
