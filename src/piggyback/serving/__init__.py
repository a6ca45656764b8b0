"""`piggyback serve`: one backbone answering many tasks over HTTP (FastAPI + uvicorn, Ray Serve).

    from piggyback import Predictor
    from piggyback.serving.app import ServeSettings, create_app
    app = create_app(Predictor.from_pretrained("models/lite0"), ServeSettings(max_batch_size=32))

FastAPI, uvicorn and Ray are an optional extra (`pip install piggyback[serve]`), so this package
imports none of them itself: the CLI registers `serve` without loading them.
"""
