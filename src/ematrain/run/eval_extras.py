"""validate.py's test-time options beyond top-1/top-5: --valid-labels, --real-labels,
--metrics-avg and --retry, each as timm's validate.py means it.

Each works on one rank's share of the evaluation in the order the loader gives it and keeps
counts that sum across torchrun processes (`totals` / `result(totals)`), so distributed
evaluation gives the numbers of a single process, as the rest of validation does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..util.errors import UserError

METRIC_AVERAGES = ("micro", "macro", "weighted")


def read_valid_labels(path: str | Path, num_classes: int) -> list[int]:
    """--valid-labels: the class indices to score, one per line (timm's format), each a class of
    the model's and listed once."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--valid-labels {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        labels = [int(line) for line in lines if line]
    except ValueError:
        raise UserError(f"--valid-labels {path}: expected one class index per line") from None
    bad = [i for i in labels if not 0 <= i < num_classes]
    if not labels or bad or len(set(labels)) < len(labels):
        what = (f"index {bad[0]} is not one of the model's {num_classes} classes" if bad else
                "no index" if not labels else "an index is listed twice")
        raise UserError(f"--valid-labels {path}: {what}")
    return labels


class ValidLabels:
    """The model's outputs for the listed classes only, in the file's order: the targets are
    positions in that list (a partial label space such as ImageNet-A's 200 classes)."""

    def __init__(self, labels: Sequence[int], device: torch.device | None = None):
        self.index = torch.tensor(list(labels), dtype=torch.long, device=device)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output.index_select(1, self.index.to(output.device))

    @property
    def num_classes(self) -> int:
        return int(self.index.numel())


class RealLabels:
    """--real-labels: ImageNet's reassessed labels ("Are we done with ImageNet?"), read by timm's
    `RealLabelsImagenet`. An image counts as right at k when any of its top-k classes is one of
    its real labels; images without real labels are left out, as timm does.

    `order` is this rank's dataset indices in the order its loader yields them.
    """

    def __init__(self, filenames: Sequence[str], real_json: str, order: Sequence[int],
                 topk: tuple[int, ...] = (1, 5)):
        from timm.data import RealLabelsImagenet
        basenames = [os.path.basename(f) for f in filenames]
        try:
            table = RealLabelsImagenet(basenames, real_json=real_json, topk=topk).real_labels
        except AssertionError:
            raise UserError(f"--real-labels {real_json}: it labels a different number of images "
                            f"than the split's {len(basenames)}") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"--real-labels {real_json}: cannot read it ({exc})") from None
        missing = [b for b in basenames if b not in table]
        if missing:
            raise UserError(f"--real-labels {real_json}: no entry for {missing[0]} (timm's file "
                            f"names ImageNet's validation images ILSVRC2012_val_<n>.JPEG)")
        self.labels = [table[basenames[i]] for i in order]
        self.topk, self.seen = topk, 0
        self.totals = torch.zeros(len(topk) + 1, dtype=torch.float64)  # hits per k, images

    def add(self, output: torch.Tensor) -> None:
        top = output.topk(min(max(self.topk), output.size(1)), dim=1).indices.tolist()
        for pred in top:
            real = self.labels[self.seen]
            self.seen += 1
            if not real:
                continue
            for j, k in enumerate(self.topk):
                self.totals[j] += any(p in real for p in pred[:k])
            self.totals[-1] += 1

    def result(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        """Accuracy at each k in percent, from this rank's totals or the summed ones."""
        totals = self.totals if totals is None else totals
        count = float(totals[-1])
        if count == 0:
            raise UserError("--real-labels: none of the evaluated images has a real label")
        return {f"top{k}": 100.0 * float(totals[j]) / count for j, k in enumerate(self.topk)}


class ClassMetrics:
    """--metrics-avg: precision, recall and F1 of the top-1 predictions, by scikit-learn as in
    timm's validate.py (zero_division=0), from a confusion matrix that sums across ranks."""

    def __init__(self, num_classes: int, average: str):
        if average not in METRIC_AVERAGES:
            raise UserError(f"--metrics-avg must be one of {', '.join(METRIC_AVERAGES)}, "
                            f"got {average!r}")
        try:
            import sklearn.metrics  # noqa: F401  (an optional extra: say so before the work)
        except ImportError:
            raise UserError("--metrics-avg needs scikit-learn: pip install scikit-learn") from None
        self.average = average
        self.totals = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def add(self, output: torch.Tensor, targets: torch.Tensor) -> None:
        pred = output.argmax(dim=1).cpu()
        n = self.totals.size(0)
        cells = targets.cpu().long() * n + pred
        self.totals += torch.bincount(cells, minlength=n * n).view(n, n).double()

    def result(self, totals: torch.Tensor | None = None) -> dict[str, float]:
        from sklearn.metrics import f1_score, precision_score, recall_score
        totals = self.totals if totals is None else totals
        true, pred = torch.nonzero(totals, as_tuple=True)
        weight = totals[true, pred].numpy()
        args = (true.numpy(), pred.numpy())
        kwargs = dict(average=self.average, sample_weight=weight, zero_division=0)
        a = self.average
        return {f"{a}_precision": round(100 * precision_score(*args, **kwargs), 4),
                f"{a}_recall": round(100 * recall_score(*args, **kwargs), 4),
                f"{a}_f1_score": round(100 * f1_score(*args, **kwargs), 4)}


def with_retry(evaluate: Callable[[int], dict], batch_size: int, log=print) -> dict:
    """--retry: `evaluate(batch_size)`, again at timm's next smaller batch size
    (`decay_batch_step`) after an error that a smaller batch can cure (out of memory; timm's
    `check_batch_size_retry` says which)."""
    from timm.utils import check_batch_size_retry, decay_batch_step
    while True:
        try:
            return evaluate(batch_size)
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            smaller = decay_batch_step(batch_size)
            if not check_batch_size_retry(str(exc)) or not smaller:
                raise UserError(f"validation failed at batch size {batch_size}: "
                                f"{text[:160]}") from None
            log(f"validation failed at batch size {batch_size} ({text[:80]}); retrying at "
                f"{smaller}")
            batch_size = smaller


class EvalExtras:
    """What validate.py's --valid-labels, --real-labels, --metrics-avg and --log-freq add to one
    evaluation pass (`evaluation.validate` calls `output` on each weight set's output and
    `progress` before each batch where there is no progress bar)."""

    def __init__(self, valid: ValidLabels | None = None, real: RealLabels | None = None,
                 metrics: ClassMetrics | None = None, log_every: int = 0, log=print):
        self.valid, self.real, self.metrics = valid, real, metrics
        self.log_every, self.log = log_every, log

    def output(self, output: torch.Tensor, targets: torch.Tensor, first: bool) -> torch.Tensor:
        if self.valid is not None:
            output = self.valid(output)
        if first:
            if self.real is not None:
                self.real.add(output)
            if self.metrics is not None:
                self.metrics.add(output, targets)
        return output

    def progress(self, batch: int, total: int) -> None:
        if self.log_every and batch % self.log_every == 0:
            self.log(f"  validate [{batch:>4d}/{total}]")

    def update(self, result: dict, reduce: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device) -> dict:
        """`result` (the first set's) with the ReaL accuracies in place of top-1/top-5 and the
        class metrics added, from the counts of every rank."""
        def summed(totals: torch.Tensor) -> torch.Tensor:
            return reduce(totals.to(device)).cpu()
        result = dict(result)
        if self.real is not None:
            result.update(self.real.result(summed(self.real.totals)))
        if self.metrics is not None:
            result.update(self.metrics.result(summed(self.metrics.totals)))
        return result
