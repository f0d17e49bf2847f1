"""validate.py: evaluate a checkpoint's raw or EMA weights on an ImageFolder split, or (with
--posthoc RUN_DIR) reconstruct EMAs of many lengths from a run's post-hoc snapshots and score them
all in one pass."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import torch
from timm.utils.misc import natural_key

from ..checkpoint.files import load_file, write_file
from ..checkpoint.weights import Weights, select_weights
from ..posthoc import series as snapshot_series
from ..posthoc import selection, snapshots, sweep
from ..run import tracking
from ..run.eval_config import with_test_time_pool
from ..run.eval_extras import (
    ClassMetrics,
    EvalExtras,
    RealLabels,
    ValidLabels,
    read_valid_labels,
    with_retry,
)
from ..run.evaluation import (
    WeightBank,
    build_model,
    check_classes,
    eval_batch_size,
    evaluation_dtype,
    naflex_evaluation,
    open_split,
    resolve_data_config,
    split_loader,
    validate,
)
from ..run.start_weights import read
from ..settings.validate_specs import ValidateSettings, validate_settings
from ..util import distributed
from ..util.atomic import atomic_write_text
from ..util.errors import UserError
from ..util.invocation import command_name
from ..util.logs import log
from ..util.modules import unwrap_model
from ..util.seeding import seed_everything
from .entry import exit_process, run_main


def results_record(arch: str, result: dict, model, data_config: dict) -> dict:
    """timm's validate.py results, its fields in its order (ours follow): top-1 and top-5 as
    measured (not rounded: they equal the training log's), their errors, parameters in
    millions and the evaluation transform."""
    return {"model": arch, "top1": result["top1"], "top1_err": 100.0 - result["top1"],
            "top5": result["top5"], "top5_err": 100.0 - result["top5"],
            "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "img_size": data_config["input_size"][-1], "crop_pct": data_config.get("crop_pct"),
            "interpolation": data_config.get("interpolation")}


def write_results(path: str, results: dict | list[dict], kind: str) -> None:
    """`results` as one JSON object (a list for bulk mode) or CSV rows (`kind`), written
    atomically."""
    path = Path(path)
    if kind == "json":
        text = json.dumps(results, indent=2) + "\n"
    else:
        rows = results if isinstance(results, list) else [results]
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    atomic_write_text(path, text)


def read_weights(s: ValidateSettings) -> tuple[dict, Weights | None]:
    """The file's contents and the weights to evaluate (none to read for timm's --pretrained)."""
    if s.pretrained:
        return {}, None
    if s.pretrained_path and not s.choice.wants_ema:
        return read(s.pretrained_path, prefer_ema=True)
    ckpt = load_file(s.source)
    c = s.choice
    return ckpt, select_weights(ckpt, s.source, use_ema=c.use_ema, ema_index=c.ema_index,
                                ema_decay=c.ema_decay)


def _main(argv: list[str]) -> int:
    s = validate_settings(argv)
    info, device = distributed.init_distributed(s.device, None)
    try:
        targets = bulk_targets(s)
        if targets is not None:
            return evaluate_bulk(s, targets, info, device)
        return _evaluate(s, info, device)
    finally:
        distributed.shutdown()


def _evaluate(s: ValidateSettings, info, device) -> int:
    if s.posthoc:
        return evaluate_posthoc(s, info, device)
    results = score(s, info, device)
    if results is not None and s.results_file:
        write_results(s.results_file, results, s.results_kind)
        log.info(f"results written to {s.results_file}")
    return 0


def bulk_targets(s: ValidateSettings) -> list[tuple[str | None, str | None]] | None:
    """timm's bulk mode, as (model, checkpoint) pairs: every checkpoint file of a --checkpoint
    folder, or with --pretrained every timm model --model names (``all``, or a wildcard);
    None when one model is evaluated."""
    if s.checkpoint and Path(s.checkpoint).is_dir():
        files = [p for p in Path(s.checkpoint).iterdir()
                 if p.is_file() and p.name.endswith((".pth.tar", ".pth", ".safetensors"))]
        if not files:
            raise UserError(f"--checkpoint {s.checkpoint}: a folder without checkpoint files")
        return [(s.model, str(p)) for p in sorted(files, key=lambda p: natural_key(p.name))]
    if s.pretrained and s.model and (s.model == "all" or any(c in s.model for c in "*?[")):
        import timm
        names = timm.list_models("*" if s.model == "all" else s.model, pretrained=True)
        if not names:
            raise UserError(f"--model {s.model}: no timm model with pretrained weights matches")
        return [(name, None) for name in names]
    return None


def evaluate_bulk(s: ValidateSettings, targets, info, device) -> int:
    """One results row per model (timm's bulk mode), best top-1 first; a model that cannot be
    evaluated is said in one line and skipped, as timm does."""
    rows = []
    for model, checkpoint in targets:
        one = dataclasses.replace(s, model=model, checkpoint=checkpoint, results_file="")
        try:
            row = score(one, info, device)
        except UserError as exc:
            log.warning(f"skipped {model or checkpoint}: {exc}")
            continue
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: r["top1"], reverse=True)
    if info.is_primary and s.results_file:
        write_results(s.results_file, rows, s.results_kind)
        log.info(f"results of {len(rows)} models written to {s.results_file}")
    return 0 if rows else 1


def score(s: ValidateSettings, info, device) -> dict | None:
    """Evaluate one model; its results record (None on the other ranks)."""
    seed_everything(s.test.seed)
    ckpt, weights = read_weights(s)
    split_dir, dataset = open_split(s, s.num_classes or ckpt.get("num_classes"))
    check_classes(ckpt, dataset, split_dir)
    model, arch = build_model(s, ckpt, dataset, weights, device)
    name = weights.name if weights is not None else "pretrained"
    data_config = resolve_data_config(s.image, ckpt, model, s.precision.channels_last, s.test)
    classes = int(getattr(unwrap_model(model), "num_classes", len(dataset.classes)))
    model, data_config = test_time_model(s, model, data_config)
    naflex = naflex_evaluation(s, ckpt, model, arch)
    reduce = lambda t: distributed.all_reduce_sum(t, info)

    def evaluate(batch_size: int | None) -> dict:
        loader, normalize = split_loader(s, info, dataset, ckpt, data_config, device, batch_size,
                                         naflex=naflex)
        extras = eval_extras_for(s, dataset, loader, device, classes)
        precision = s.precision.on(device)
        result = validate(model, loader, device, reduce=reduce, show=info.is_primary,
                          normalize=normalize, amp_dtype=precision.autocast,
                          channels_last=precision.channels_last, extras=extras)[0]
        return extras.update(result, reduce, device)
    if s.test.retry:
        result = with_retry(evaluate, eval_batch_size(s, ckpt), log=log.info)
    else:
        result = evaluate(None)
    if not info.is_primary:
        return None
    results = results_record(arch, result, model, data_config)
    results.update(checkpoint=str(s.source), weights=name, loss=result["loss"],
                   count=result["count"])
    results.update({k: v for k, v in result.items() if k.startswith(s.test.metrics_avg or "-")})
    print(f"{arch} ({name}) on {split_dir}: top1 {result['top1']:.4f} top5 "
          f"{result['top5']:.4f} loss {result['loss']:.4f} images {result['count']}", flush=True)
    return results


def test_time_model(s: ValidateSettings, model, data_config: dict):
    """--reparam, --test-pool and --torchcompile, in timm's validate.py order."""
    if s.test.reparam:
        from timm.utils.model import reparameterize_model
        model = reparameterize_model(model)
    if s.test.test_pool:
        model, data_config, applied = with_test_time_pool(model, data_config)
        if applied:
            log.info(f"--test-pool: test-time pooling at {data_config['input_size'][-1]} px "
                     f"(crop 1.0)")
    if s.test.torchcompile:
        model = torch.compile(model, backend=s.test.torchcompile, mode=s.test.torchcompile_mode)
    return model, data_config


def eval_extras_for(s: ValidateSettings, dataset, loader, device,
                    model_classes: int) -> EvalExtras:
    """--valid-labels, --real-labels, --metrics-avg and --log-freq for one pass of `loader`."""
    t = s.test
    valid = (ValidLabels(read_valid_labels(t.valid_labels, model_classes), device)
             if t.valid_labels else None)
    real = None
    if t.real_labels:
        if s.dataset.streaming:
            raise UserError("--real-labels matches images by file name and order: give an "
                            "ImageFolder split or a map-style --dataset, not a stream")
        order = list(iter(loader.sampler))
        real = RealLabels([path for path, _ in dataset.samples], t.real_labels, order)
    classes = valid.num_classes if valid is not None else model_classes
    metrics = ClassMetrics(classes, t.metrics_avg) if t.metrics_avg else None
    return EvalExtras(valid, real, metrics, t.log_freq, log=log.info)


def evaluate_posthoc(s, info, device) -> int:
    """validate.py --posthoc: the sweep, scored in one pass over the images that choose (and the
    pick, the raw weights and the tracked EMAs in one more over those that report, with
    --select-split or --select-fraction), reported and saved (rank 0)."""
    series, targets, solution = sweep.sweep_plan(s.posthoc, s.sigma_rel, s.half_life)
    meta = series.meta
    run_dir = series.folder.parent if series.folder.name == snapshots.FOLDER else series.folder
    sweep.check_outputs_writable(run_dir)  # every rank: each stops at once, none waits for another
    sel = s.select
    protocol = selection.protocol_for(sel.select_split, sel.select_fraction, sel.select_seed,
                                      sel.select_metric, s.split, meta["args"])
    chooser, reporter = posthoc_images(s, protocol, meta)
    protocol = named_as_found(protocol, chooser, reporter)
    if info.is_primary:
        sweep.remove_stale_outputs(run_dir)
    raw, last_ckpt = sweep.raw_weights(run_dir)
    emas = sweep.run_emas(last_ckpt, run_dir / "last.pth.tar")
    formed = snapshot_series.accumulate(series, solution)
    states, clamped = formed.states, formed.clamped
    sweep.finite_or_fail(states, [t.label for t in targets])
    tracked = [{k: t.float() if t.is_floating_point() else t for k, t in shadow.items()}
               for shadow in formed.last]
    log.info(sweep.describe(series, targets, clamped))
    rows = sweep.plan_rows(series, targets, solution.fit_errors, raw is not None,
                           [name for name, _ in emas])
    first = raw if raw is not None else tracked[0]
    weights = Weights(first, "raw" if raw is not None else "ema", None)
    model, arch = build_model(s, meta, (reporter or chooser).dataset, weights, device,
                              path=series.snapshots[-1].path)
    data_config = resolve_data_config(s.image, meta, model)
    dtype = evaluation_dtype(states[0], device, meta["eval_dtype"])
    fixed = [state for _, state in emas] + (tracked if raw is not None else tracked[1:])
    bank = WeightBank(model, fixed + states, dtype)
    # What the run's trackers need of its last checkpoint (the rest is in the bank now).
    last_run = ({k: last_ckpt.get(k) for k in ("args", "trackers", "counters")}
                if last_ckpt else None)
    del tracked, formed, fixed, emas, last_ckpt
    score = ScorePass(s, info, meta, data_config, device, model,
                      naflex_evaluation(s, meta, model, arch))
    for row, result in zip(rows, score(chooser, bank)):
        row.result = result
    best = sweep.best_row(rows, protocol.metric)
    report = None
    if reporter is not None:  # the pick, the raw weights and the tracked EMAs, on other images
        keep = list(range(len(rows) - len(targets))) + [best]
        results = score(reporter, bank.subset([i - 1 for i in keep[1:]]))
        report = [dataclasses.replace(rows[i], result=r) for i, r in zip(keep, results)]
    if not info.is_primary:
        return 0
    parts = [sweep.Part("selection" if report else "same", chooser.split_dir, rows, best)]
    if report:
        parts.append(sweep.Part("report", reporter.split_dir, report, len(report) - 1))
    chosen = best - (len(rows) - len(targets))
    best_file = sweep.best_checkpoint(meta, states[chosen], raw, parts, targets[chosen], series,
                                      dtype or torch.float32, protocol)
    write_posthoc(run_dir, arch, parts, protocol, best_file, len(series.snapshots))
    tracking.log_posthoc(run_dir, last_run, rows, best, protocol.metric)  # its trackers, if any
    return 0


def write_posthoc(run_dir: Path, arch: str, parts: list, protocol, best_file: dict,
                  snapshot_count: int) -> None:
    """The sweep's tables on the console, posthoc.csv, posthoc.png and the best file."""
    print("\n".join(sweep.tables(arch, parts, protocol)), flush=True)
    sweep.write_csv(run_dir / sweep.CSV, parts, protocol)
    sweep.plot(run_dir / sweep.PNG, parts[0].rows,
               f"{run_dir.name}: post-hoc EMA, {snapshot_count} snapshots, "
               f"scored on {parts[0].where()}")
    write_file(run_dir / sweep.BEST, best_file)
    log.info(f"{sweep.summary_line(parts, protocol)}; wrote {run_dir / sweep.CSV}, "
             f"{run_dir / sweep.PNG}, {run_dir / sweep.BEST}")


@dataclasses.dataclass(frozen=True)
class Images:
    """Images of one split that a pass scores: its folder, its ImageFolder and which of its
    images (None: all)."""
    split_dir: Path
    dataset: object
    indices: object = None


def posthoc_images(s, protocol: selection.Protocol, meta: dict) -> tuple[Images, Images | None]:
    """The images that choose and those that report (None: the same ones), their class folders
    checked against the run's: before any weights are read."""
    num_classes = s.num_classes or meta.get("num_classes")
    split_dir, dataset = open_split(s, num_classes)
    check_classes(meta, dataset, split_dir)
    if protocol.separate and s.dataset.streaming:  # its loader reads --split's shards only
        raise UserError("--select-split and --select-fraction need a map-style split (an "
                        "ImageFolder or a non-streaming --dataset): a stream has no fixed "
                        "images to divide")
    if protocol.mode == "split":
        select_dir, chooser = open_split(s, num_classes, protocol.select_split)
        if same_split(select_dir, split_dir):
            raise UserError(f"--select-split {protocol.select_split} is {split_dir}, the split "
                            f"that is reported: choose on another split, or with "
                            f"--select-fraction")
        check_classes(meta, chooser, select_dir)
        return Images(select_dir, chooser), Images(split_dir, dataset)
    if protocol.mode == "fraction":
        if getattr(dataset, "targets", None) is None:
            raise UserError(f"--select-fraction needs a split whose labels are known before it "
                            f"is read (a folder or a map-style --dataset), not {split_dir}: "
                            f"choose on another split with --select-split")
        chosen, rest = selection.stratified_parts(dataset.targets, protocol.fraction,
                                                  protocol.seed, dataset.classes)
        return Images(split_dir, dataset, chosen), Images(split_dir, dataset, rest)
    return Images(split_dir, dataset), None


def named_as_found(protocol: selection.Protocol, chooser: Images,
                   reporter: Images | None) -> selection.Protocol:
    """The protocol with its splits named as the folders found (timm's default `validation`
    finds `val`), so the csv and the best file say which images they mean."""
    def name(images: Images, asked: str) -> str:
        return images.split_dir.name if isinstance(images.split_dir, Path) else asked
    report = reporter or chooser
    return dataclasses.replace(protocol, report_split=name(report, protocol.report_split),
                               select_split=name(chooser, protocol.select_split))


def same_split(a, b) -> bool:
    """Two splits are one: the same folder (`val` and `validation` can name one), or the same
    name of one --dataset."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return str(a) == str(b)


class ScorePass:
    """One pass of the live model and a bank of weight sets over some images (each rank its
    share, summed), as training scores them."""

    def __init__(self, s, info, meta: dict, data_config: dict, device, model, naflex=None):
        self.s, self.info, self.meta, self.data_config = s, info, meta, data_config
        self.device, self.model, self.naflex = device, model, naflex

    def __call__(self, images: Images, bank: WeightBank) -> list[dict]:
        loader, normalize = split_loader(self.s, self.info, images.dataset, self.meta,
                                         self.data_config, self.device, indices=images.indices,
                                         naflex=self.naflex)
        info = self.info
        return validate(self.model, loader, self.device, ema=bank, show=info.is_primary,
                        normalize=normalize, reduce=lambda t: distributed.all_reduce_sum(t, info))


def main(argv=None) -> int:
    return run_main(command_name("validate.py"), _main, argv)


def entry() -> None:
    """The command (`python validate.py`, `ematrain-validate`): main, then a quick exit."""
    exit_process(main())


if __name__ == "__main__":
    entry()
