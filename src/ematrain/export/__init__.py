"""``python -m ematrain export``: one set of a run's weights, as timm publishes weights.

`choose` finds the weights (raw, an EMA, the post-hoc best) in a checkpoint or a run folder,
`average` makes timm's avg_checkpoints.py average of the run's best checkpoints, `publish`
writes the weights alone with timm's model config beside them, `command` is the CLI.
"""
from .command import entry, main

__all__ = ["entry", "main"]
