"""Load test of `piggyback serve`: throughput and latency with dynamic batching, against the same
requests answered one at a time.

Two servers run side by side (separate processes, same model directory, same torch threads):
one batching (`--max-batch-size`, `--max-wait-ms`), one with `--max-batch-size 1` (every
request its own forward pass). For each number of concurrent clients, the same requests (the
same images, tasks cycling over the model's tasks) go to each server in turn, `--repeats` times,
interleaved so that a noisy machine slows both alike; the median run is reported. Clients are
asyncio tasks in this process (aiohttp: see `run_load`), each sending its next request when the
previous one is answered (closed loop), to 127.0.0.1 only, a fixed number of requests per run.

Without --model-dir, a model directory is made with `--tasks` tasks on the backbone (masks drawn
around the threshold: serving cost does not depend on what a task learned).

    python benchmarks/serve_load.py --images ../shared/data/flowers102 --clients 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from environment import environment

from piggyback.serving.settings import CPU_MAX_WAIT_MS

MODES = ("batched", "one_at_a_time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="serve this model (default: make one)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", help="local backbone weights (with --backbone timm:NAME)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128, help="the tasks' input size")
    parser.add_argument("--images", type=Path, help="folder of JPEG/PNG images to send")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=192, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument(
        "--max-wait-ms", type=float, default=CPU_MAX_WAIT_MS, help="as piggyback serve's"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads per server (default: as piggyback serve)"
    )
    parser.add_argument(
        "--batch-threads", type=int, help="for batches of 8+ (default: as piggyback serve)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve-cpu"))
    return parser.parse_args(argv)


# -- the model and the requests -----------------------------------------------------------------


def make_model_dir(args: argparse.Namespace, directory: Path) -> Path:
    """`--tasks` tasks of 10, 43, 102, 200, ... classes with masks drawn around the threshold."""
    import torch

    from piggyback import PiggybackModel
    from piggyback.backbones import create_backbone
    from piggyback.preprocess import Preprocess

    backbone = create_backbone(args.backbone, weights=args.weights)
    model = PiggybackModel(backbone.model, backbone_spec=backbone.spec)
    sizes = [10, 43, 102, 200]
    for index in range(args.tasks):
        classes = sizes[index % len(sizes)]
        state = model.add_task(f"task{index}", classes, seed=index)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for score in state.parameters():
                score.copy_(torch.rand(score.shape, generator=generator) * 6e-3 + 4.2e-3)
        state.metadata.preprocess = Preprocess.from_data_config(
            backbone.data_config, args.image_size
        ).to_dict()
    return model.save_pretrained(directory)


def request_images(args: argparse.Namespace) -> list[bytes]:
    """The encoded images sent: the first files of --images (sorted), or random JPEGs."""
    if args.images is not None:
        files = sorted(
            p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        )[: args.num_images]
        if not files:
            raise SystemExit(f"no .jpg/.png images in {args.images}")
        return [p.read_bytes() for p in files]
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(args.num_images):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


# -- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(
    model_dir: Path, batch_size: int, wait_ms: float, threads: tuple[int, int]
) -> Iterator[str]:
    """`piggyback serve` in a subprocess on 127.0.0.1; yields its URL, stops it afterwards."""
    port = free_port()
    command = [
        sys.executable, "-m", "piggyback.cli", "serve", str(model_dir), "--port", str(port),
        "--device", "cpu", "--threads", str(threads[0]), "--batch-threads", str(threads[1]),
        "--max-batch-size", str(batch_size),
        "--max-wait-ms", str(wait_ms),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads[0])}
    env.pop("PIGGYBACK_API_KEY", None)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {' '.join(command)}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health").status_code == 200
    except httpx.TransportError:
        return False


# -- load -----------------------------------------------------------------------------------------


async def run_load(
    url: str, clients: int, images: list[bytes], tasks: list[str], total: int
) -> dict[str, Any]:
    """`total` requests from `clients` closed-loop clients; request i: image i, task i % tasks.

    The clients share the machine with the server, so they should cost it little: they use
    aiohttp, measured here at 0.5-1 ms of CPU per request against 4-8 ms for httpx's
    AsyncClient (which, on 2 cores, took CPU from the batched server more than from the one
    whose single inference thread is the bottleneck). Their CPU time is reported.
    """
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:

        async def one_client() -> None:
            nonlocal failures
            for index in counter:
                form = aiohttp.FormData()
                image = images[index % len(images)]
                form.add_field("image", image, filename="img.jpg", content_type="image/jpeg")
                form.add_field("task", tasks[index % len(tasks)])
                form.add_field("top_k", "5")
                started = time.perf_counter()
                async with session.post("/v1/predict", data=form) as response:
                    await response.read()
                    failures += response.status != 200
                latencies.append(time.perf_counter() - started)

        async with session.get("/metrics") as response:
            before = (await response.json())["batches"]
        load_average = os.getloadavg()[0]  # other work on the machine, for the record
        cpu_before, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_before
        async with session.get("/metrics") as response:
            after = (await response.json())["batches"]
    batches = after["count"] - before["count"]
    predictions = after["items"] - before["items"]
    sizes = {
        size: count - before["sizes"].get(size, 0)
        for size, count in after["sizes"].items()
        if count > before["sizes"].get(size, 0)
    }
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return {
        "requests": total,
        "failures": failures,
        "seconds": round(wall, 3),
        "throughput_rps": round(total / wall, 2),
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        "mean_batch_size": round(predictions / batches, 2) if batches else 0.0,
        "batch_sizes": dict(sorted(sizes.items(), key=lambda item: -item[1])),  # size: count
        "client_cpu_ms_per_request": round(client_cpu / total * 1000, 2),
        "load_average_1min": round(load_average, 2),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput (its latencies belong to the same run)."""
    ordered = sorted(runs, key=lambda r: r["throughput_rps"])
    return {
        **ordered[len(ordered) // 2],
        "all_throughputs": [r["throughput_rps"] for r in runs],
        "all_load_averages": [r["load_average_1min"] for r in runs],
    }


def round_speedups(runs: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Batched over one-at-a-time throughput of each round (the two runs made one after the
    other). The machine's speed drifts from minute to minute; a round's two runs share it, so
    the spread of these ratios shows how far the headline ratio (of the median runs) can move."""
    pairs = zip(runs["batched"], runs["one_at_a_time"], strict=True)
    return [round(b["throughput_rps"] / s["throughput_rps"], 2) for b, s in pairs]


def model_only(args: argparse.Namespace, model_dir: Path, images: list[bytes]) -> dict[str, Any]:
    """What batching buys the model itself, without HTTP, decoding or other clients: the same
    `--max-batch-size` images (tasks cycling) as one mixed-task `Predictor.predict` call against
    one call per image, in this process with the servers' thread counts, interleaved repeats.
    The images are prepared first (`Predictor.prepare`), as the server's decoding threads do:
    this is the work of its inference thread."""
    import torch

    from piggyback import Predictor
    from piggyback.images import decode_image
    from piggyback.runtime import tune_allocator
    from piggyback.serving.server import ThreadsPerBatch

    tune_allocator()  # as the `piggyback` command does in the servers
    small, large = thread_counts(args)
    torch.set_num_threads(small)
    predictor = Predictor.from_pretrained(model_dir, device="cpu")
    engine = ThreadsPerBatch(predictor, small=small, large=large)  # as the servers run it
    names = predictor.tasks
    tasks = [names[i % len(names)] for i in range(args.max_batch_size)]
    pictures = [
        predictor.prepare(decode_image(images[i % len(images)]), task)
        for i, task in enumerate(tasks)
    ]

    def batched() -> None:
        engine.predict(pictures, tasks, top_k=5)

    def one_by_one() -> None:
        for picture, task in zip(pictures, tasks, strict=True):
            engine.predict([picture], [task], top_k=5)

    batched(), one_by_one()  # warm-up: every task's masked weights cached
    seconds: dict[str, list[float]] = {"batched": [], "one_at_a_time": []}
    for _ in range(args.repeats):
        for mode, run in (("batched", batched), ("one_at_a_time", one_by_one)):
            started = time.perf_counter()
            run()
            seconds[mode].append(time.perf_counter() - started)
    per_image = {m: statistics.median(s) / len(pictures) * 1000 for m, s in seconds.items()}
    return {
        "images": len(pictures),
        "ms_per_image": {m: round(v, 2) for m, v in per_image.items()},
        "speedup": round(per_image["one_at_a_time"] / per_image["batched"], 2),
    }


def measure(args: argparse.Namespace, model_dir: Path, images: list[bytes]) -> dict[str, Any]:
    threads = thread_counts(args)
    sizes = {"batched": args.max_batch_size, "one_at_a_time": 1}
    waits = {"batched": args.max_wait_ms, "one_at_a_time": 0.0}
    with contextlib.ExitStack() as stack:
        urls = {
            mode: stack.enter_context(server(model_dir, sizes[mode], waits[mode], threads))
            for mode in MODES
        }
        tasks = [t["name"] for t in httpx.get(urls["batched"] + "/v1/tasks").json()["tasks"]]
        for url in urls.values():  # warm-up: first forward passes, allocator, connections
            asyncio.run(run_load(url, 4, images, tasks, 16))
        results: dict[str, Any] = {}
        for clients in args.clients:
            runs: dict[str, list] = {mode: [] for mode in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    load = run_load(urls[mode], clients, images, tasks, args.requests)
                    runs[mode].append(asyncio.run(load))
            row = {mode: median_run(runs[mode]) for mode in MODES}
            row["speedup"] = round(
                row["batched"]["throughput_rps"] / row["one_at_a_time"]["throughput_rps"], 2
            )
            row["round_speedups"] = round_speedups(runs)
            results[str(clients)] = row
            print(f"{clients:>3} clients: {json.dumps(row)}", flush=True)
    return {
        "tasks": tasks,
        "server_threads": threads[0],
        "server_batch_threads": threads[1],
        "results": results,
    }


def thread_counts(args: argparse.Namespace) -> tuple[int, int]:
    """Torch threads for small batches and for batches of 8+, as `piggyback serve` sizes them."""
    from piggyback.serving.server import available_cores, default_threads

    return args.threads or default_threads(), args.batch_threads or available_cores()


def write_table(report: dict[str, Any], path: Path) -> None:
    args = report["args"]
    lines = [
        f"{args['tasks']} tasks on {args['backbone']} at {args['image_size']} px, "
        f"{report['server_threads']} torch thread(s) per server for batches under 8 images and "
        f"{report['server_batch_threads']} from 8 (as `piggyback serve` on this machine), "
        f"{args['requests']} requests "
        f"per run (tasks cycling), median of {args['repeats']} runs; batched: "
        f"--max-batch-size {args['max_batch_size']} --max-wait-ms {args['max_wait_ms']:g}.",
        "",
        "| clients | batched req/s | p50 / p99 ms | mean batch (commonest sizes) "
        "| one at a time req/s | p50 / p99 ms | throughput ratio | ratio per round: median "
        "(range) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for clients, row in report["results"].items():
        b, s = row["batched"], row["one_at_a_time"]
        sizes = list(b["batch_sizes"].items())[:3]
        commonest = ", ".join(f"{size} x{count}" for size, count in sizes)
        rounds = row["round_speedups"]
        lines.append(
            f"| {clients} | {b['throughput_rps']:.1f} | {b['p50_ms']:.0f} / {b['p99_ms']:.0f} "
            f"| {b['mean_batch_size']:.1f} ({commonest}) | {s['throughput_rps']:.1f} "
            f"| {s['p50_ms']:.0f} / {s['p99_ms']:.0f} | {row['speedup']:.2f}x "
            f"| {statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f}) |"
        )
    alone = report["model_only"]
    lines += [
        "",
        f"The model alone (no HTTP, no decoding or preprocessing, the servers' threads): "
        f"{alone['images']} images with "
        f"tasks cycling as one mixed-task `Predictor.predict` call, "
        f"{alone['ms_per_image']['batched']:.1f} ms per image, against one call per image, "
        f"{alone['ms_per_image']['one_at_a_time']:.1f} ms: {alone['speedup']:.2f}x.",
    ]
    loads = [
        value
        for row in report["results"].values()
        for mode in MODES
        for value in row[mode]["all_load_averages"]
    ]
    client_cpu = [
        row[mode]["client_cpu_ms_per_request"]
        for row in report["results"].values()
        for mode in MODES
    ]
    lines.append(
        f"Load average (1 min) of the machine during the runs: {min(loads):.1f} to "
        f"{max(loads):.1f} on {report['environment']['machine']['cores']} cores; the clients "
        f"(aiohttp, same machine) used {min(client_cpu):.1f} to {max(client_cpu):.1f} ms of CPU "
        "per request."
    )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    images = request_images(args)
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model_dir or make_model_dir(args, Path(work) / "model")
        alone = model_only(args, model_dir, images)
        print(f"model only: {json.dumps(alone)}", flush=True)
        measured = {**measure(args, model_dir, images), "model_only": alone}
    report = {
        "environment": environment(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "image_bytes_mean": int(statistics.mean(len(i) for i in images)),
        **measured,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(report, args.out / "table.md")
    print((args.out / "table.md").read_text())
    return report


if __name__ == "__main__":
    main()
