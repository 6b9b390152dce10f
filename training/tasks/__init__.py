"""Task adapters: one per task, the seam between data, model and metrics."""
