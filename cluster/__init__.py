"""rayfine control plane: configuration, CLI, connecting to Ray, job submission."""

__version__ = "0.1.0"
