"""Class lists: a --class-map file read as timm reads it, checked against the classes the data has,
and labels checked against the class count."""
from __future__ import annotations

import numbers
import os
import pickle

from ...util.errors import UserError


def load_class_map(path: str, root: str | None = None) -> dict[str, int]:
    """``{class name: index}`` from a .txt (one name a line, index = line) or a .pkl file (timm's
    restricted unpickler), with indices 0..C-1 each used once."""
    from timm.data.readers.class_map import load_class_map as timm_load_class_map

    try:
        mapping = timm_load_class_map(path, root or "")
    except (AssertionError, OSError, ValueError, pickle.UnpicklingError, EOFError) as exc:
        raise UserError(f"--class-map {path}: cannot read it ({str(exc)[:120] or type(exc).__name__})"
                        ) from None
    if not mapping:
        raise UserError(f"--class-map {path}: it names no classes")
    indices = sorted(mapping.values())
    if (not all(isinstance(i, numbers.Integral) for i in indices)
            or indices != list(range(len(indices)))):
        raise UserError(f"--class-map {path}: indices must be 0..{len(mapping) - 1}, each once "
                        f"(got {indices[:6]}{' ...' if len(indices) > 6 else ''})")
    blank = [i for name, i in mapping.items() if not str(name).strip()]
    if blank:
        raise UserError(f"--class-map {path}: line {blank[0] + 1} is empty (a class without a name)")
    return {str(name): int(i) for name, i in mapping.items()}


def names_in_order(mapping: dict[str, int]) -> list[str]:
    return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]


def check_named(mapping: dict[str, int], found: list[str], path: str, where: str) -> None:
    """Every class the map names is one the data has."""
    missing = [name for name in names_in_order(mapping) if name not in set(found)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"--class-map {path} names {len(missing)} class(es) that {where} does not "
                        f"have: {shown} (it has: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''})")


def check_label(label, num_classes: int, where: str) -> int:
    """A label as an int in 0..num_classes-1."""
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise UserError(f"{where}: label {label!r} is not a class index (give --class-map to map "
                        f"class names to indices)")
    if not 0 <= label < num_classes:
        raise UserError(f"{where}: label {label} is outside the {num_classes} classes "
                        f"(0..{num_classes - 1}); give --num-classes or a --class-map that covers it")
    return int(label)


class ValueLabels:
    """Labels stored as values: class indices (their count from --class-map or --num-classes),
    or class names that --class-map maps to indices (wds/ `.cls` files and json fields, a Hugging
    Face label column that is not a ClassLabel)."""

    def __init__(self, class_map: str, root: str | None, num_classes: int | None, where: str):
        self.mapping = load_class_map(class_map_path(class_map, root)) if class_map else None
        if self.mapping is not None:
            self.classes = names_in_order(self.mapping)
            if num_classes and num_classes != len(self.classes):
                raise UserError(f"--num-classes {num_classes} disagrees with --class-map "
                                f"{class_map} ({len(self.classes)} classes)")
        elif num_classes:
            self.classes = [str(i) for i in range(num_classes)]
        else:
            raise UserError(f"{where}: its labels are class indices with no class list; give "
                            f"--num-classes N or a --class-map naming the classes")
        self.class_map = class_map

    def __call__(self, value, where: str) -> int:
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace").strip()
        if isinstance(value, str):
            if self.mapping is not None and value in self.mapping:
                return self.mapping[value]
            if not value.lstrip("-").isdigit():
                raise UserError(f"{where}: label '{value[:40]}' is not a class index"
                                + (f" nor a class of --class-map {self.class_map}"
                                   if self.mapping is not None else
                                   " (give --class-map to map class names to indices)"))
            value = int(value)
        return check_label(value, len(self.classes), where)


def class_map_path(path: str, root: str | None) -> str:
    """The file a --class-map names: as given, else relative to the data root (as timm looks)."""
    if os.path.isfile(path) or not root:
        return path
    return os.path.join(root, path)
