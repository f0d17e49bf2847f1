"""The checkpoint format, and its one owner.

* `schema`: the keys (`SCHEMA`, the README's table), who owns each, `save(run)` and
  `restore(run, ckpt)`, the run's record, the weights-only file; older layouts upgraded.
* `files`: writing atomically, and the one safe loader every reader uses (no pickled code runs).
* `weights`: which weights of a file to take (raw, an EMA by index, decay or name).
* `timm_checkpoints`: timm's checkpoints in our terms.

``from ematrain.checkpoint import SCHEMA, load_file, ...``: the names below, imported on use.
"""
from ematrain.util.exports import lazy_exports

_NAMES = {
    **dict.fromkeys(["CHECKPOINT_VERSION", "Key", "SCHEMA", "schema_markdown", "run_record", "save",
                     "ema_entries", "weights_file", "OPTIONAL_PARTS", "restore", "ema_state",
                     "upgrade", "is_ours", "peek", "args_dict"], ".schema"),
    **dict.fromkeys(["write_file", "safe_load", "load_file", "check_structure",
                     "is_state_dict"], ".files"),
    **dict.fromkeys(["ema_keys", "ema_decays", "ema_names", "ema_index_for_decay", "Weights",
                     "select_weights", "strip_prefixes", "load_weights_into"], ".weights"),
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
