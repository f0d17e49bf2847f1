"""Decoding one sample's image, and what an unreadable one does (--corrupt-samples).

`stop` (the default): the first unreadable image ends the run with one line naming it. `skip`:
the sample is left out and counted; the count is said at the end of each epoch. A sample whose
image or label field is missing is never skipped: that is a wrong --input-key / --target-key or a
broken writer, and skipping would drop every sample.
"""
from __future__ import annotations

import io
import multiprocessing

from PIL import Image

from ...util.errors import UserError

# Consecutive unreadable samples after which a map-style reader stops even under `skip`: the
# data is broken, not a few files in it (timm's ImageDataset gives up after 10 as well).
MAX_CONSECUTIVE = 10


class CorruptSample(UserError):
    """An image that cannot be decoded (or a damaged tar member)."""


def corrupt_hint(message: str) -> str:
    return f"{message} (--corrupt-samples skip leaves such samples out, counted)"


def decode(data, mode: str, where: str) -> Image.Image:
    """`data` (bytes, a file object or a path) as a PIL image in `mode`."""
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = io.BytesIO(data)
        with Image.open(data) as img:
            return img.convert(mode) if mode and img.mode != mode else img.copy()
    except Image.DecompressionBombError:
        raise CorruptSample(f"cannot read image {where}: its header claims more pixels than any "
                            f"real image (a decompression bomb?)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = "not a valid image" if "cannot identify" in str(exc) else str(exc)[:100]
        raise CorruptSample(f"cannot read image {where}: {reason}") from None


class SkipCount:
    """Samples skipped as unreadable, counted across loader worker processes (shared memory,
    handed to workers when they start, as timm's SharedCount)."""

    def __init__(self):
        self._value = multiprocessing.Value("q", 0)

    def add(self, n: int = 1) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return self._value.value

    def take(self) -> int:
        """The count so far, reset to zero (one epoch's)."""
        with self._value.get_lock():
            value, self._value.value = self._value.value, 0
        return value
