"""Every EMA a run keeps, as one collection: the regular shadows (``--model-ema``) and the power
EMAs that post-hoc EMA tracks (``--model-ema-posthoc``) alike.

Both are `ModelEma` instances averaged after every optimizer step, waited for before their
shadows are read, checked for NaN/Inf, validated and saved: the collection does each of these
once for all of them, in one order (regular first), so nothing else branches on which EMAs a run
has. Only what differs is asked by name: ``regular`` (its shadows have best files, BatchNorm
policies and switch-EMA, horizon lines) and ``posthoc`` (its shadows are snapshotted).
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from .model_ema import ModelEma

ROLES = ("regular", "posthoc")


class EmaCollection:
    """The run's EMAs: ``regular`` and ``posthoc``, each a `ModelEma` or None.

    Shadows are numbered across the collection (`shadows`, `nonfinite`): the regular EMA's
    first, then the post-hoc EMA's, the order validation scores them in.
    """

    def __init__(self, regular: ModelEma | None = None, posthoc: ModelEma | None = None):
        self.regular, self.posthoc = regular, posthoc

    def members(self) -> dict[str, ModelEma]:
        """The EMAs the run has, by role, in order."""
        found = {"regular": self.regular, "posthoc": self.posthoc}
        return {role: ema for role, ema in found.items() if ema is not None}

    def __iter__(self) -> Iterator[ModelEma]:
        return iter(self.members().values())

    def __len__(self) -> int:
        return len(self.members())

    def __bool__(self) -> bool:
        return bool(self.members())

    def update(self, model: nn.Module) -> None:
        """After an optimizer step: every EMA counts it, and averages when its interval ends."""
        for ema in self:
            ema.update(model)

    def wait(self) -> None:
        """Wait for every update still running in the background (shadows in host memory)."""
        for ema in self:
            ema.wait()

    @property
    def shadows(self) -> list[nn.Module]:
        """Every shadow module, numbered across the collection (`wait` before reading them)."""
        return [shadow for ema in self for shadow in ema.shadows]

    def spans(self) -> dict[str, range]:
        """Each role's shadows as a range of collection-wide numbers."""
        out, start = {}, 0
        for role, ema in self.members().items():
            out[role] = range(start, start + len(ema.shadows))
            start += len(ema.shadows)
        return out

    def nonfinite(self) -> list[int]:
        """Numbers of the shadows holding NaN or Inf (empty when all are finite): one read of
        every shadow."""
        spans = self.spans()
        return [spans[role][i] for role, ema in self.members().items()
                for i in ema.nonfinite_shadows()]

    def state_dict(self) -> dict[str, dict]:
        """Each EMA's `full_state_dict`, by role."""
        return {role: ema.full_state_dict() for role, ema in self.members().items()}

    def load_state_dict(self, state: dict[str, dict], other_decays: bool = False) -> None:
        """Each EMA's full state, by role, all roles this collection has (`other_decays`: see
        `load_member`)."""
        missing = [role for role in self.members() if role not in state]
        if missing:
            raise ValueError(f"no state for the {' and '.join(missing)} EMA")
        for role in self.members():
            self.load_member(role, state[role], other_decays)

    def load_member(self, role: str, state: dict, other_decays: bool = False) -> None:
        """One EMA's full state (`ModelEma.load_full_state_dict`). `other_decays` applies to the
        regular EMA, whose decays may follow a half-life, never to the post-hoc EMA's
        sigma_rels."""
        self.members()[role].load_full_state_dict(
            state, other_decays=other_decays and role == "regular")
