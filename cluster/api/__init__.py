"""``rayfine api``: an OpenAI-compatible fine-tuning jobs server in front of a Ray cluster.

    server.py       `rayfine api`: load the base models, check the cluster, run uvicorn
    settings.py     ApiSettings and the base models (run configs named NAME=config.yaml)
    app.py          build_app: FastAPI routes for files, jobs, events, checkpoints and models; auth; body cap
    protocol.py     request models and the OpenAI response objects (the HTTP edge)
    errors.py       APIError and OpenAI's error shape
    store.py        SQLite state: files, jobs, events, checkpoints (survives restarts)
    validation.py   record checks of uploaded files and of a job's files (the training task adapters' checks)
    hyperparams.py  OpenAI hyperparameters -> the job's run config (built only from the base config)
    runner.py       the background loop: validate, submit as a Ray job, follow it, record events, cancel
    progress.py     run folder -> events and checkpoints (metrics.jsonl, checkpoints/*/trainer_state.json)

The server never imports ``serving`` (serving depends on cluster, not the reverse) and imports ``training``
only for the record checks, which need neither torch nor Ray.
"""
