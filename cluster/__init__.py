"""rayfine's top layer: the CLI, the ``run`` pipeline, Ray job submission and the fine-tuning jobs API.

It starts or joins Ray (``cluster.ray_start``) and calls into ``training`` and ``serving``, which import only
``core``.
"""
