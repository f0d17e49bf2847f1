"""A training run: built from its settings (`build`: `build_run` -> `parts.Run`), trained epoch by
epoch (`training.Training`, around `loop.EpochLoop` and `step.train_step`), scored (`evaluation`),
kept on disk (`keeper`: the checkpoint files; `folder`, `summary`, `curves`), reported (`report`)
and restored (`restore`). `model` and `start_weights` create the timm model and its first
weights; `optimizer` builds timm's optimizer and LR schedule; `weight_sets` names the raw weights
and each EMA everywhere they appear.
"""
