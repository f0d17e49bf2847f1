"""`make demo`: noisy digits → train with three EMAs (and the post-hoc power EMAs) → validate
the best EMA checkpoint → sweep post-hoc EMA lengths, chosen on half of val, reported on the
other half.

Everything runs offline: the data set is scikit-learn's bundled handwritten digits, written once
as an ImageFolder tree under data/digits-noisy30 with 30% of the training labels moved to another
class (`data.digits`; the validation labels are true). On clean digits raw weights and EMAs all
reach 100% and the demo would show nothing; with noisy labels the raw weights are noisy, a
well-chosen EMA is better, and one too long for the run is worse (the final report says why).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from ..checkpoint.files import load_file
from ..data.digits import write_digits_imagefolder
from ..posthoc import sweep
from ..run.build import build_run
from ..run.summary import read_summary
from ..run.training import Training
from ..settings.train_specs import train_settings
from . import validate
from .entry import run_main

REPO = Path(__file__).resolve().parents[3]  # src/ematrain/cli/demo.py: the checkout
LABEL_NOISE = 0.3


def _demo(argv) -> int:
    data_root = write_digits_imagefolder(Path(f"data/digits-noisy{round(100 * LABEL_NOISE)}"),
                                         label_noise=LABEL_NOISE)
    config = REPO / "configs" / "demo.yaml"
    # Post-hoc EMA too (power EMAs sigma_rel 0.05 and 0.10, 32 snapshots in posthoc/, 1.3 GB):
    # the last step sweeps EMA lengths from them after training.
    settings = train_settings([str(data_root), "-c", str(config), "--model-ema-posthoc",
                               *(argv or [])])
    run = build_run(settings)
    training = Training(run)
    rc = training.fit()
    if rc != 0:
        return rc
    run_dir = training.run_dir
    first_ema = run.weight_sets[1]
    best = run.keeper.best[first_ema.name]["epoch"]
    row = next(r for r in read_summary(run_dir) if int(r["epoch"]) == best)
    results_file = run_dir / "validate_ema.json"
    best_file = run_dir / first_ema.best_file  # model_best.pth.tar: the first EMA's, as timm's
    rc = validate.main([str(data_root), "--checkpoint", str(best_file),
                        "--use-ema", "-j", str(settings.loader.workers_per_process()),
                        "--results-file", str(results_file)])
    if rc != 0:
        return rc
    checked = json.loads(results_file.read_text())
    print()
    rows = read_summary(run_dir)
    for s in run.weight_sets:
        if s.posthoc:  # the post-hoc block below speaks for the power EMAs
            continue
        column = f"{s.column_prefix}eval_top1"
        print(f"{s.label:>10}: top-1 {float(rows[-1][column]):6.2f} at the end, "
              f"{max(float(r[column]) for r in rows):6.2f} at its best epoch")
    print(f"run directory:     {run_dir}")
    print(f"  curves:          {run_dir / 'curves.png'}")
    print(f"  best EMA ckpt:   {best_file} (epoch {best})")
    trained = float(row[f"{first_ema.column_prefix}eval_top1"])
    print(f"EMA {first_ema.decay:g} top-1 from training (epoch {best}): {trained:.4f}")
    print(f"EMA {first_ema.decay:g} top-1 from validate.py:            {checked['top1']:.4f}")
    same = trained == checked["top1"]
    print("match: yes" if same else "match: NO")
    if not same:
        return 1
    return _posthoc(data_root, run_dir, settings.loader.workers_per_process())


def _posthoc(data_root: Path, run_dir: Path, workers: int) -> int:
    """validate.py --posthoc on the run, choosing on a stratified half of val and reporting on
    the other half; the pick's selection figure beside its report figure, and the weights a
    user had anyway on the same report half."""
    rc = validate.main([str(data_root), "--posthoc", str(run_dir), "--select-fraction", "0.5",
                        "-j", str(workers)])
    if rc != 0:
        return rc
    info = load_file(run_dir / sweep.BEST)["posthoc"]
    chose, report = info["selection"], info["report"]
    with open(run_dir / sweep.CSV, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["part"] == "report"]
    print()
    print(f"post-hoc EMA pick: {info['target']} (fit error {info['fit_error']:.2%}), chosen by "
          f"{info['protocol']['metric']} on half of val ({chose['images']} images)")
    print(f"  top-1 on the half that chose it:    {chose['top1']:6.2f} (selection: not a figure "
          f"to report)")
    print(f"  top-1 on the other half:            {report['top1']:6.2f} (report)")
    beside = ", ".join(f"{r['weights']} {float(r['top1']):.2f}" for r in rows
                       if r["chosen"] != "1")
    print(f"  on the report half, beside it:      {beside}")
    return 0


def main(argv=None) -> int:
    return run_main("demo", _demo, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
