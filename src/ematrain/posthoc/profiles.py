"""Post-hoc EMA synthesis (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", section 3): EMAs of any length reconstructed after training from snapshots
of a few power-function EMAs.

A power-function EMA with exponent ``gamma`` averages, after ``t`` updates, the iterates
``theta_1 .. theta_t`` with weights ``w_k = (k^(g+1) - (k-1)^(g+1)) / t^(g+1)`` (g = gamma): that
is what ``beta_t = (1 - 1/t)^(g+1)`` gives, exactly, since the betas' product from ``k+1`` to ``t``
telescopes to ``(k/t)^(g+1)``. Its relative width ``sigma_rel`` (the standard deviation of the
profile over ``t``) is ``sqrt(g+1) / ((g+2) sqrt(g+3))`` (`ema.schedules.gamma_to_sigma_rel`;
the tracking itself is `ema.schedules.Power`). A classic EMA of constant decay ``d``
that starts as a copy of the initial weights ``theta_0`` weighs ``theta_0`` by ``d^t`` and
``theta_k`` by ``(1-d) d^(t-k)``.

Every snapshot is a known linear combination of the iterates, so a target EMA is approximated by
the combination of snapshots whose profile is closest to the target's in the least-squares
sense, among the combinations whose coefficients sum to one. Every profile sums to one, so such
a combination rebuilds a constant weight (a LayerNorm gain, a BatchNorm variance that no longer
moves) as itself, and the mass a target puts where no snapshot reaches (its first iterates, the
initial weights of an exponential EMA) goes to the snapshots nearest it instead of being dropped:
an unconstrained fit shrinks every weight towards zero by ``1 - sum(c)``. EDM2 solves without the
constraint and divides by the sum afterwards; the constrained solution is the least-squares
optimum among exactly those combinations. Unlike EDM2, which uses the continuous profiles, the
profiles here are the discrete ones the training loop really applied (they differ for short
runs, and the exponential target's weight on ``theta_0`` has no continuous power counterpart).

The Gram matrix of the profiles is accumulated in float64 over blocks of iterates, so memory
does not grow with the run's length, and the constrained problem is solved on it by the
null-space method: the KKT system's solution, with the smallest coefficients among nearly
equivalent ones (the KKT matrix itself is singular when close snapshots, or more profiles than
iterates, make the Gram matrix so). A QR factor of the profiles instead of their Gram matrix
(condition number not squared) was measured too: the same coefficients to 3e-11 on the default
series and the same errors to 4 digits on every test signal, better only where the snapshots
represent a target exactly (fit error 1e-15 instead of 1e-10, both far below float32), at
1.6-3x the time (7.9 s against 2.8 s for 750,000 updates). The fit error is the relative L2
distance between the reconstructed and the target profile, computed from the residual itself
in a second pass over the iterates (not from the Gram matrix, where it would cancel).

Time is counted in EMA updates (``--model-ema-every N`` averages every N optimizer steps:
``(1 - N/s)^(g+1)`` at step ``s`` is ``(1 - 1/u)^(g+1)`` at update ``u = s/N``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..ema.schedules import check_decay

__all__ = ["Profile", "Solution", "solve"]

# Iterates per block when the Gram matrix is accumulated: 2^16 iterates x 100 profiles = 52 MB.
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Profile:
    """The weights an EMA gives the iterates ``theta_0 .. theta_t`` after ``t`` updates.

    Attributes:
        kind: ``"power"`` (``param`` is the exponent gamma) or ``"exp"`` (``param`` is the decay
            per EMA update; the average starts as a copy of ``theta_0``).
        param: see ``kind``.
        t: EMA updates averaged in.
    """
    kind: str
    param: float
    t: int

    def __post_init__(self):
        if self.kind not in ("power", "exp"):
            raise ValueError(f"profile kind must be power or exp, got {self.kind!r}")
        if self.t < 1:
            raise ValueError(f"a profile needs at least one update, got t={self.t}")
        if self.kind == "exp":
            check_decay(self.param)  # the classic EMA's decay per update
        if self.kind == "power" and not self.param >= 0.0:
            raise ValueError(f"power profile exponent must be >= 0, got {self.param}")

    def weights(self, start: int, stop: int) -> np.ndarray:
        """float64 weights of iterates ``start .. stop-1`` (zero past ``t``)."""
        k = np.arange(start, stop, dtype=np.float64)
        out = np.zeros(len(k))
        live = (k >= 1) & (k <= self.t)
        kl = k[live]
        if self.kind == "power":
            g1 = self.param + 1.0
            # (k^(g+1) - (k-1)^(g+1)) / t^(g+1), without the cancellation of the difference
            # (log1p(-1) = -inf at k = 1 gives the right 1 / t^(g+1)).
            with np.errstate(divide="ignore"):
                out[live] = np.exp(g1 * np.log(kl / self.t)) * -np.expm1(g1 * np.log1p(-1.0 / kl))
        else:
            log_d = math.log(self.param)
            out[live] = -math.expm1(log_d) * np.exp((self.t - kl) * log_d)
            if start == 0 and stop > 0:
                out[0] = self.param ** self.t
        return out

    @property
    def sigma_rel(self) -> float:
        """The profile's relative width: std of the iterate index under the weights, over t."""
        return self._moments()[1] / self.t

    @property
    def half_life(self) -> float:
        """Its half-life in EMA updates: the age beyond which the older half of the weight lies
        (``ln 0.5 / ln d`` for an exponential profile, ``t (1 - 2^(-1/(g+1)))`` for a power one;
        both the continuous values)."""
        if self.kind == "exp":
            return math.log(0.5) / math.log(self.param)
        return self.t * (1.0 - 2.0 ** (-1.0 / (self.param + 1.0)))

    def _moments(self) -> tuple[float, float]:
        total = mean = second = 0.0
        for start in range(0, self.t + 1, _BLOCK):
            stop = min(self.t + 1, start + _BLOCK)
            w, k = self.weights(start, stop), np.arange(start, stop, dtype=np.float64)
            total += w.sum()
            mean += (w * k).sum()
            second += (w * k * k).sum()
        mean /= total
        return mean, math.sqrt(max(second / total - mean * mean, 0.0))


@dataclass(frozen=True)
class Solution:
    """Least-squares coefficients of the snapshots for each target.

    Attributes:
        coefficients: float64 array (targets x snapshots): target j ~ sum_i c[j, i] snapshot_i;
            each row sums to one (to rounding).
        fit_errors: relative L2 error of each reconstructed profile against its target.
    """
    coefficients: np.ndarray
    fit_errors: np.ndarray

    def gain(self, index: int) -> float:
        """Sum of the absolute coefficients of target ``index``: by how much the rounding error
        of the snapshots (their dtype) can grow in the reconstruction."""
        return float(np.abs(self.coefficients[index]).sum())


def _blocks(profiles: Sequence[Profile]):
    """The weights matrix (profiles x block) of every block of the iterates any profile uses."""
    end = max(p.t for p in profiles) + 1
    for start in range(0, end, _BLOCK):
        stop = min(end, start + _BLOCK)
        yield np.stack([p.weights(start, stop) for p in profiles])


def _lstsq_sum_one(gram: np.ndarray, cross: np.ndarray, d: np.ndarray) -> np.ndarray:
    """argmin ||W x - y|| subject to ``d . x = 1``, for each target y, from the Gram matrix
    ``gram = W^T W`` and ``cross = W^T y`` (a column per target), by the null-space method:
    ``x = d / |d|^2 + N z`` with N an orthonormal basis of the vectors orthogonal to d, so the
    constraint holds for every z and ``|x|^2 = |x0|^2 + |z|^2``: the smallest-norm z that
    solves ``N^T gram N z = N^T (cross - gram x0)`` (close snapshots make it nearly singular)
    is the smallest x."""
    x0 = d / (d @ d)
    q, _ = np.linalg.qr(d[:, None], mode="complete")
    basis = q[:, 1:]
    z, *_ = np.linalg.lstsq(basis.T @ gram @ basis, basis.T @ (cross - (gram @ x0)[:, None]),
                            rcond=1e-12)
    x = x0[:, None] + basis @ z
    # The basis's rounding, grown by large coefficients, leaves d . x off by up to ~1e-13;
    # dividing by it leaves only the rounding of the sum itself.
    return x / (d @ x)


def solve(snapshots: Sequence[Profile], targets: Sequence[Profile]) -> Solution:
    """The combination of `snapshots` closest to each of `targets` in least squares, with
    coefficients that sum to one, in float64.

    The snapshots' columns are scaled to unit norm (better conditioned; the constraint becomes
    ``sum(c_i / s_i) = 1`` on the scaled coefficients), and among nearly equivalent solutions the
    one with the smallest scaled coefficients is taken: small coefficients keep the snapshots'
    rounding error small in the reconstruction.
    """
    n = len(snapshots)
    if n == 0 or not targets:
        raise ValueError("need at least one snapshot and one target")
    everything = list(snapshots) + list(targets)
    gram = np.zeros((len(everything), len(everything)))
    for block in _blocks(everything):
        gram += block @ block.T
    scale = np.sqrt(np.diag(gram)[:n])
    coef = _lstsq_sum_one(gram[:n, :n] / np.outer(scale, scale), gram[:n, n:] / scale[:, None],
                          1.0 / scale) / scale[:, None]
    residual = np.zeros(len(targets))
    for block in _blocks(everything):
        residual += ((coef.T @ block[:n]) - block[n:]) ** 2 @ np.ones(block.shape[1])
    norms = np.sqrt(np.diag(gram)[n:])
    return Solution(coef.T.copy(), np.sqrt(residual) / norms)
