"""One set of a run's weights, as timm publishes weights (``python -m ematrain export``).

`choose` finds the weights (raw, an EMA, the post-hoc best) in a checkpoint or a run folder,
`average` makes timm's avg_checkpoints.py average of the run's best checkpoints, `publish`
writes the weights alone with timm's model config beside them; the command is `cli.export`.
"""
from .average import average_best
from .choose import Chosen, choose
from .publish import HUB_CONFIG, publish

__all__ = ["HUB_CONFIG", "Chosen", "average_best", "choose", "publish"]
