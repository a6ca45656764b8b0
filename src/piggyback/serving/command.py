"""The `piggyback serve` command (registered in `piggyback.cli`).

Kept apart from the server so that the CLI starts without importing FastAPI, uvicorn or Ray:
they load only when the command runs, and are an optional extra (`pip install piggyback[serve]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from piggyback.errors import PiggybackError

__all__ = ["serve_command"]

Opt = typer.Option


class ServeError(PiggybackError):
    """The server cannot start as asked (missing extra, bad option)."""


def serve_command(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (from `piggyback train`).")],
    host: Annotated[str, Opt(help="Address to bind; 0.0.0.0 exposes it to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, Opt()] = 8000,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    max_batch_size: Annotated[
        int, Opt(help="Most images in one forward pass; also the most per request.")
    ] = 32,
    max_wait_ms: Annotated[
        float | None,
        Opt(
            help="Longest a batch waits for requests still being decoded to join it "
            "(default 50 on CPU; 5 on a GPU, and with --ray: Ray waits this long every batch)."
        ),
    ] = None,
    max_upload_mb: Annotated[float, Opt(help="Largest request body accepted.")] = 10.0,
    max_image_pixels: Annotated[int, Opt(help="Largest image (width x height) decoded.")] = (
        40_000_000
    ),
    decode_threads: Annotated[
        int | None, Opt(help="Images decoded at once (each may take ~1 GB); default: cores.")
    ] = None,
    body_timeout_s: Annotated[
        float, Opt(help="Seconds a request body may pause before the request gets 408.")
    ] = 30.0,
    api_key: Annotated[
        str | None,
        Opt(
            envvar="PIGGYBACK_API_KEY",
            help="Bearer token required on every route but /health (default: none).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        Opt(help="Torch threads (local server: for batches under 8 images); default cores - 1."),
    ] = None,
    batch_threads: Annotated[
        int | None,
        Opt(help="Torch threads for batches of 8 images or more (default: every core)."),
    ] = None,
    max_cached_tasks: Annotated[
        int, Opt(help="Tasks whose masked weights stay computed in memory (LRU).")
    ] = 4,
    batch_invariant: Annotated[
        bool, Opt(help="Each image answered exactly as if sent alone, whatever it is batched with.")
    ] = False,
    ray: Annotated[
        bool, Opt("--ray", help="Serve on Ray Serve (replicas behind its HTTP proxy).")
    ] = False,
    replicas: Annotated[int, Opt(help="Ray Serve replicas (with --ray).")] = 1,
) -> None:
    """Answer image classification requests for every task of a model over HTTP (and a page)."""
    try:
        from piggyback.serving.app import ServeSettings
    except ImportError as error:
        raise ServeError(
            f"serving needs the 'serve' extra ({error.name} is missing): "
            "pip install 'piggyback[serve]'"
        ) from error
    from piggyback.device import resolve_device

    settings = ServeSettings(
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        max_image_pixels=max_image_pixels,
        api_key=api_key,
        decode_threads=decode_threads,
        body_timeout_s=body_timeout_s,
    )
    options = {
        "host": host,
        "port": port,
        "device": str(resolve_device(device)),
        "threads": threads,
        "max_cached_tasks": max_cached_tasks,
        "batch_invariant": batch_invariant,
    }
    if ray:
        if batch_threads is not None:
            raise ServeError("--batch-threads applies to the local server, not to --ray replicas")
        from piggyback.serving.ray_app import run_on_ray

        run_on_ray(model_dir, settings, replicas=replicas, **options)
        return
    from piggyback.serving.server import serve

    serve(model_dir, settings=settings, batch_threads=batch_threads, **options)
