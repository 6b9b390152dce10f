"""rayfine's base layer: the contracts every other package shares, importing none of them.

    config.py        the run config schema (pydantic), YAML loading, ``--set`` overrides
    errors.py        UserError / ConfigError: a message for the person, never a traceback
    run_folder.py    the run folder's layout (config.yaml, metrics.jsonl, checkpoints/, model/, eval.json, ...)
    model_folder.py  the exported model folder's contract: rayfine.json (typed), task names, default chat template
    openai_errors.py OpenAI's error shape and bearer API-key checks (the Serve app and the jobs API)
    ray_connect.py   connecting to Ray (called by the top layer only)
    ray_private.py   the private Ray APIs rayfine relies on, each with the Ray version it was checked against
    collector.py     Python's cycle collector paused while a process starts up (the CLI, each training worker)
"""

__version__ = "0.1.0"
