"""Images in, batches out: ImageFolder splits (`folders`), timm's transforms and the batch
normalization (`transforms`), seeded loaders (`loaders`) and samplers (`samplers`), and the demo's
digits (`digits`, ``python -m ematrain.data.digits DIR``).

``from ematrain.data import make_loader, ...``: the names below, imported on use.
"""
from ematrain.util.exports import lazy_exports

_NAMES = {
    **dict.fromkeys(["resolve_split_dir", "SplitFolder", "load_image_folder",
                     "check_same_classes"], ".folders"),
    **dict.fromkeys(["DATA_CONFIG_KEYS", "MAX_RESIZE", "MAX_NORMALIZED", "data_config_for",
                     "check_data_config", "train_transform", "batch_eraser", "eval_transform",
                     "Normalize"], ".transforms"),
    **dict.fromkeys(["make_loader", "batches", "end_workers"], ".loaders"),
    **dict.fromkeys(["SeededSamples", "EpochTagged", "EpochSampler"], ".samplers"),
    "write_digits_imagefolder": ".digits",
}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
