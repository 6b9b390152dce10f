"""rayfine training: data pipeline, task adapters, DeepSpeed config, train loop, tuning, evaluation, export."""
