"""The driver: run config, step loop, placement, checkpoints, metrics, evaluation and the CLI."""
