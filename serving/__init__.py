"""rayfine serving: Ray Serve apps for exported model folders.

    deploy.py        `rayfine serve`: resolve the target, start/join Ray and Serve, deploy, or write a Serve config
    app.py           the deployment (RayfineServer): loads the model, dynamic batching, generation thread
    router.py        FastAPI routes, auth, error handlers, access log and metrics middleware
    completions.py   OpenAI chat/completions, SSE streaming
    protocol.py      pydantic request/response models (the HTTP edge)
    errors.py        the one error shape, and the proxy middleware that applies it to Serve's own errors
    model_folder.py  reading the model folder contract (rayfine.json, task inference, default chat template)
    encoders.py      classification / NER / QA logic with length-bucketed batches (no HTTP)
    generation.py    causal LM sampling, stop sequences, streaming deltas (no HTTP)
    telemetry.py     Prometheus metrics via ray.util.metrics, JSON access log

``serving`` imports ``cluster`` (the config) and never ``training``: the exported model folder is the contract.
"""
