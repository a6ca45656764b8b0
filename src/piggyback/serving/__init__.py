"""`piggyback serve`: one backbone answering many tasks over HTTP (FastAPI + uvicorn, Ray Serve).

    from piggyback.serving.app import ServeSettings, create_app
    from piggyback.serving.engine import ModelEngine
    app = create_app(ModelEngine("models/lite0"), ServeSettings(max_batch_size=32))

FastAPI, uvicorn and Ray are an optional extra (`pip install piggyback[serve]`), so this package
imports none of them itself: the CLI registers `serve` without loading them.
"""
