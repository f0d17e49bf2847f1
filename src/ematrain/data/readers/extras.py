"""The optional packages of the data readers, imported when a reader needs one, and Hugging Face's
network switch: nothing is fetched unless --dataset-download says so."""
from __future__ import annotations

import contextlib
import importlib

from ...util.errors import UserError

INSTALL = "pip install 'ematrain[data]'"


def need(package: str, reader: str):
    """`package` imported, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise UserError(f"--dataset {reader}/ needs the '{package}' package, which is not "
                        f"installed ({exc.name or package} missing): {INSTALL}") from None


@contextlib.contextmanager
def hub_access(allowed: bool, reader: str = "hfds"):
    """Hugging Face's hub offline inside the block unless `allowed` (--dataset-download): a name
    that is neither a local folder nor in the cache then fails at once, instead of a download
    (or a wait on a network that is not there). The library reads its switch from its config
    at each call, so setting it there (and back after) works after import too."""
    datasets = need("datasets", reader)
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    if not allowed:
        datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield datasets
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
