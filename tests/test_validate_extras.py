"""validate.py's test-time options (`ematrain.eval_extras`) compute what timm's validate.py
computes: --valid-labels scores the listed classes only, --real-labels ImageNet's reassessed
labels, --metrics-avg scikit-learn's precision/recall/F1; each from counts that add up across
torchrun processes to the single-process numbers; --retry steps the batch size down as timm."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from ematrain.run.eval_extras import (
    ClassMetrics,
    RealLabels,
    ValidLabels,
    read_valid_labels,
    with_retry,
)
from ematrain.util.errors import UserError


def test_valid_labels_select_the_listed_classes_in_order(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text("3\n1\n\n4\n")
    labels = read_valid_labels(path, num_classes=5)
    assert labels == [3, 1, 4]
    output = torch.arange(10.0).view(2, 5)
    assert ValidLabels(labels)(output).tolist() == [[3.0, 1.0, 4.0], [8.0, 6.0, 9.0]]
    for text, message in [("7\n", "not one of the model's 5"), ("1\n1\n", "twice"),
                          ("a\n", "one class index per line"), ("", "no index")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_valid_labels(path, num_classes=5)
    with pytest.raises(UserError, match="cannot read"):
        read_valid_labels(tmp_path / "absent.txt", 5)


def _real_labels_files(tmp_path, n=6):
    names = [f"class_{i % 2}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(n)]
    # Image 3 has no real label (left out); image 4 has two.
    real = [[0], [1], [], [2], [1, 3], [0]][:n]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    return names, str(path), real


def _outputs():
    # Top-1 per image: 0, 2, 1, 2, 3, 4; top-2 adds 1, 1, 0, 0, 1, 0.
    rows = [[5, 4, 0, 0, 0], [0, 4, 5, 0, 0], [4, 5, 0, 0, 0], [4, 0, 5, 0, 0],
            [0, 4, 0, 5, 0], [4, 0, 0, 0, 5]]
    return torch.tensor(rows, dtype=torch.float32)


def test_real_labels_score_any_real_label_and_skip_unlabelled_images(tmp_path):
    names, path, real = _real_labels_files(tmp_path)
    scorer = RealLabels(names, path, order=range(6), topk=(1, 2))
    out = _outputs()
    scorer.add(out[:4])
    scorer.add(out[4:])
    # Labelled images 0, 1, 3, 4, 5: top-1 right for 0, 3, 4 -> 3/5; top-2 also 1 and 5 -> 5/5.
    assert scorer.result() == pytest.approx({"top1": 60.0, "top2": 100.0})


def test_real_labels_of_two_ranks_add_up_to_one_process(tmp_path):
    names, path, _ = _real_labels_files(tmp_path)
    out = _outputs()
    # Ranks take whole batches in turn (batch 2): rank 0 images 0, 1, 4, 5; rank 1 images 2, 3.
    rank0 = RealLabels(names, path, order=[0, 1, 4, 5], topk=(1, 2))
    rank1 = RealLabels(names, path, order=[2, 3], topk=(1, 2))
    rank0.add(out[[0, 1]])
    rank1.add(out[[2, 3]])
    rank0.add(out[[4, 5]])
    assert rank0.result(rank0.totals + rank1.totals) == pytest.approx({"top1": 60.0, "top2": 100.0})


def test_real_labels_that_do_not_fit_the_split_are_one_line(tmp_path):
    names, path, _ = _real_labels_files(tmp_path)
    with pytest.raises(UserError, match="different number of images"):
        RealLabels(names[:5], path, order=range(5))
    other = [n.replace("ILSVRC2012_val_", "img_") for n in names]
    with pytest.raises(UserError, match="no entry for img_00000001.JPEG"):
        RealLabels(other, path, order=range(6))


@pytest.mark.parametrize("average", ["micro", "macro", "weighted"])
def test_class_metrics_are_sklearns_on_the_predictions(average):
    g = torch.Generator().manual_seed(0)
    output = torch.randn(40, 4, generator=g)
    targets = torch.randint(0, 4, (40,), generator=g)
    whole = ClassMetrics(4, average)
    whole.add(output, targets)
    pred = output.argmax(1).numpy()
    expected = {f"{average}_{name}": round(100 * fn(targets.numpy(), pred, average=average,
                                                     zero_division=0), 4)
                for name, fn in [("precision", precision_score), ("recall", recall_score),
                                 ("f1_score", f1_score)]}
    assert whole.result() == pytest.approx(expected)
    halves = [ClassMetrics(4, average) for _ in range(2)]
    halves[0].add(output[:25], targets[:25])
    halves[1].add(output[25:], targets[25:])
    assert halves[0].result(halves[0].totals + halves[1].totals) == pytest.approx(expected)
    with pytest.raises(UserError, match="micro, macro, weighted"):
        ClassMetrics(4, "samples")


def test_retry_steps_the_batch_size_down_as_timm_until_it_fits():
    tried, said = [], []

    def evaluate(batch_size):
        tried.append(batch_size)
        if batch_size > 10:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"top1": 1.0, "batch_size": batch_size}

    assert with_retry(evaluate, 64, log=said.append)["batch_size"] == 8
    assert tried == [64, 48, 32, 24, 16, 12, 8]  # timm's decay_batch_step
    assert len(said) == 6 and "retrying at 48" in said[0]

    def broken(batch_size):
        raise RuntimeError("an illegal memory access was encountered")

    with pytest.raises(UserError, match="batch size 64: an illegal memory access"):
        with_retry(broken, 64, log=said.append)
