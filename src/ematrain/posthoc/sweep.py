"""The post-hoc sweep (validate.py DATA --posthoc RUN_DIR): which EMAs to reconstruct from a
run's snapshots, and what is made of their scores.

The targets are power profiles (``--sigma-rel``) and classic exponential EMAs (``--half-life``,
in the training flag's units), all at the end of the series. Each is the least-squares
combination of the snapshots (`profiles.solve`), formed in float64 (`series.synthesize`), and
scored beside the raw weights of the run's last.pth.tar and the tracked EMAs' last snapshots in
one pass over the split (`cli.validate.evaluate_posthoc`, through `run.evaluation.validate`).
The results go to a table, ``posthoc.csv``, ``posthoc.png`` and ``model_posthoc_best.pth.tar``
in the run folder.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.files import load_file
from ..checkpoint.schema import weights_file
from ..checkpoint.weights import ema_keys, select_weights
from ..ema.half_life import decay_from_half_life, parse_half_life
from ..ema.schedules import sigma_rel_to_gamma
from ..util.atomic import atomic_write, atomic_write_text
from ..util.errors import UserError
from ..util.logs import log
from .profiles import Profile, solve
from .selection import Protocol, best_index
from .series import Series, read_series

CSV = "posthoc.csv"
PNG = "posthoc.png"
BEST = "model_posthoc_best.pth.tar"
# The default sweep: this many power profiles, log-spaced from a quarter of the shortest tracked
# sigma_rel to 2.5 times the longest (capped below the uniform average).
DEFAULT_COUNT = 10
# Fit errors above this are flagged in the table and drawn hollow in the plot.
POOR_FIT = 0.05


@dataclass(frozen=True)
class Target:
    """One EMA to reconstruct: its profile at the end of the series and how the user named it."""
    label: str
    profile: Profile


@dataclass
class Row:
    """One scored weight set of the sweep."""
    label: str
    kind: str          # raw, ema (a regular EMA of the run), tracked, power, exp
    sigma_rel: float | None
    half_life_ep: float | None
    fit_error: float | None
    result: dict | None = None


def default_sigma_rels(tracked: tuple[float, ...]) -> list[float]:
    """About ten lengths spanning the tracked ones and beyond, log-spaced, 3 digits."""
    low, high = min(tracked) / 4, min(max(tracked) * 2.5, 0.25)
    return [float(f"{v:.3g}") for v in np.geomspace(low, high, DEFAULT_COUNT)]


def targets_for(series: Series, sigma_rels: list[float] | None,
                half_lives: list[str] | None) -> list[Target]:
    """The requested targets (the default sweep when none is given), checked: one line each."""
    t, meta = series.updates, series.meta
    targets = []
    if sigma_rels is None:  # the default sweep, also beside --half-life targets
        sigma_rels = default_sigma_rels(series.sigma_rels)
    for s in sigma_rels or []:  # each checked by ValidateSettings
        targets.append(Target(f"sigma_rel {s:g}", Profile("power", sigma_rel_to_gamma(s), t)))
    for text in half_lives or []:
        half_life = parse_half_life(str(text))
        steps = half_life.in_updates(meta["images_per_step"], meta["steps_per_epoch"])
        try:  # the per-update decay, an update every `every` optimizer steps
            decay = decay_from_half_life(steps, meta["every"])
        except ValueError:
            raise UserError(f"--half-life {text} is {steps:.3g} optimizer steps: no decay in "
                            f"(0, 1) has it") from None
        targets.append(Target(f"half-life {text}", Profile("exp", decay, t)))
    return targets


def raw_weights(run_dir: Path) -> tuple[dict | None, dict | None]:
    """The run's last.pth.tar (its raw weights score beside the EMAs), or (None, None)."""
    path = run_dir / "last.pth.tar"
    if not path.is_file():
        log.info(f"{path} not found: the raw weights are not scored")
        return None, None
    ckpt = load_file(path)
    return select_weights(ckpt, path).state, ckpt


def run_emas(ckpt: dict | None, path: Path) -> list[tuple[str, dict]]:
    """The regular EMAs the run tracked beside the power ones (--model-ema-decay,
    --model-ema-half-life), as last.pth.tar holds them at the end of the series: (name, weights)
    each, scored beside the reconstructions."""
    if ckpt is None:
        return []
    chosen = (select_weights(ckpt, path, ema_index=i) for i in range(len(ema_keys(ckpt))))
    return [(w.name, w.state) for w in chosen]


def plan_rows(series: Series, targets: list[Target], fit_errors, has_raw: bool,
              emas: list[str] = ()) -> list[Row]:
    """The rows in scoring order: raw, the run's regular EMAs (`emas`: their names), the
    tracked power EMAs, the targets."""
    per_epoch = series.updates_per_epoch()
    rows = [Row("raw", "raw", None, None, None)] if has_raw else []
    rows += [Row(name, "ema", None, None, None) for name in emas]
    for s, g in zip(series.sigma_rels, series.gammas):
        profile = Profile("power", g, series.updates)
        rows.append(Row(f"tracked {s:g}", "tracked", s, profile.half_life / per_epoch, 0.0))
    for target, err in zip(targets, fit_errors):
        p = target.profile
        sigma = (float(target.label.split()[-1]) if p.kind == "power" else p.sigma_rel)
        rows.append(Row(target.label, p.kind, sigma, p.half_life / per_epoch, float(err)))
    return rows


def best_row(rows: list[Row], metric: str) -> int:
    """Index of the best reconstruction by `metric` (top-1/top-5: ties broken by the lower
    loss; `selection.best_index`)."""
    candidates = [i for i, r in enumerate(rows) if r.kind in ("power", "exp")]
    return best_index([r.result for r in rows], candidates, metric)


@dataclass(frozen=True)
class Part:
    """One scored table of the sweep: which images (`name`: same, selection or report), the
    rows scored on them and the pick's index among them. `split_dir`: the split's folder, or
    for a --dataset split the words that name it."""
    name: str
    split_dir: Path | str
    rows: list[Row]
    pick: int

    @property
    def split(self) -> str:
        return self.split_dir.name if isinstance(self.split_dir, Path) else str(self.split_dir)

    @property
    def images(self) -> int:
        return self.rows[0].result["count"]

    def where(self) -> str:
        what = {"selection": "the selection part of", "report": "the report part of"}
        return f"{what.get(self.name, '')} {self.split}".strip()

    def figures(self) -> dict:
        """The pick's scores here, as the best file records them."""
        res = self.rows[self.pick].result
        return {"split": self.split, "images": self.images, "top1": res["top1"],
                "top5": res["top5"], "loss": res["loss"]}


def headings(arch: str, part: Part, protocol: Protocol) -> str:
    """A table's heading: which images, how the best was chosen, and whether its figure is
    fit to report."""
    where = f"{arch} on {part.split_dir}, {part.images} images"
    if part.name == "same":
        return (f"{where}; the best ({protocol.rule()}) is chosen on these same images, so its "
                f"figure is optimistic (--select-split or --select-fraction for a figure to "
                f"report):")
    if part.name == "selection":
        return (f"SELECTION: {where}"
                + (f" ({protocol.fraction:g} of the split, stratified, seed {protocol.seed})"
                   if protocol.mode == "fraction" else "")
                + f"; the best ({protocol.rule()}) is chosen here:")
    return (f"REPORT: {where}, none of which took part in the choice: the pick beside the raw "
            f"weights and the tracked EMAs (the figures to report):")


def tables(arch: str, parts: list[Part], protocol: Protocol) -> list[str]:
    """Every table of the sweep with its heading, the report rows labelled as such."""
    lines = []
    for part in parts:
        mark = "  <- best" if part.name != "report" else "  <- the pick, reported"
        lines += ([""] if lines else []) + [headings(arch, part, protocol)]
        lines += table(part.rows, part.pick, mark, "report " if part.name == "report" else "")
    return lines


def table(rows: list[Row], best: int, mark: str = "  <- best", prefix: str = "") -> list[str]:
    """The console table: length as sigma_rel and half-life in epochs, scores, fit error."""
    lines = [f"{'weights':<29} {'sigma_rel':>9} {'half-life ep':>12} {'top1':>8} {'top5':>8} "
             f"{'loss':>8} {'fit error':>10}"]
    for i, r in enumerate(rows):
        res = r.result
        fit = "" if r.fit_error is None else f"{r.fit_error:.2e}"
        if r.fit_error is not None and r.fit_error > POOR_FIT:
            fit += " poor"
        lines.append(f"{prefix + r.label:<29} {_num(r.sigma_rel, '.4g'):>9} "
                     f"{_num(r.half_life_ep, '.3g'):>12} {res['top1']:8.2f} {res['top5']:8.2f} "
                     f"{res['loss']:8.4f} {fit:>10}" + (mark if i == best else ""))
    return lines


def summary_line(parts: list[Part], protocol: Protocol) -> str:
    """The log's last word: the pick, its selection figure and the figure to report."""
    pick = parts[0].rows[parts[0].pick]
    m = protocol.metric
    text = f"best: {pick.label} ({m} {pick.result[m]:.4f} on {parts[0].where()}"
    if len(parts) > 1:
        text += f"; {m} {parts[1].rows[parts[1].pick].result[m]:.4f} on {parts[1].where()}"
    return text + ")"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cell(value) -> str:
    return "" if value is None else f"{value:.6g}"


CSV_COLUMNS = ["weights", "kind", "sigma_rel", "half_life_epochs", "fit_error", "part", "split",
               "images", "top1", "top5", "loss", "chosen", "protocol", "select_metric"]


def write_csv(path: Path, parts: list[Part], protocol: Protocol) -> None:
    """posthoc.csv: a row per weight set and table (`part`: same, selection or report; `chosen`:
    1 for the pick), each saying the protocol and the metric of the choice."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for part in parts:
        for i, r in enumerate(part.rows):
            writer.writerow([r.label, r.kind, _cell(r.sigma_rel), _cell(r.half_life_ep),
                             _cell(r.fit_error), part.name, part.split, part.images,
                             f"{r.result['top1']:.4f}", f"{r.result['top5']:.4f}",
                             f"{r.result['loss']:.6f}", int(i == part.pick),
                             protocol.describe(), protocol.metric])
    atomic_write_text(path, buf.getvalue())


def posthoc_name(row: Row) -> str:
    """How validate.py names the reconstruction of model_posthoc_best.pth.tar: by its length
    (``posthoc sr0.0921``, ``posthoc hl2ep``) and fit error."""
    length = (f"sr{row.sigma_rel:.3g}" if row.kind == "power"
              else "hl" + row.label.removeprefix("half-life ").replace(" ", ""))
    return f"posthoc {length} (fit error {row.fit_error:.2%})"


def best_checkpoint(meta: dict, state: dict, raw: dict | None, parts: list[Part], target: Target,
                    series: Series, scored: torch.dtype, protocol: Protocol) -> dict:
    """model_posthoc_best.pth.tar: the reconstruction as timm's `state_dict_ema` (also our
    validate.py --use-ema), with its length, fit, the protocol of its choice and its figures
    under `posthoc` (`selection`: where it was chosen; `report`: images the choice never saw, or
    None; top1/top5/loss: the figure to report, the report part's where there is one) (`scored`:
    the dtype it was scored in)."""
    row = parts[0].rows[parts[0].pick]
    figures = [p.figures() for p in parts]
    shown = figures[-1]
    posthoc = {"target": row.label, "kind": target.profile.kind, "sigma_rel": row.sigma_rel,
               "half_life_epochs": row.half_life_ep, "fit_error": row.fit_error,
               "updates": series.updates, "step": series.snapshots[-1].step,
               "snapshots": len(series.snapshots), "tracked_sigma_rels": list(series.sigma_rels),
               "protocol": protocol.record(), "selection": figures[0],
               "report": figures[1] if len(figures) > 1 else None,
               "top1": shown["top1"], "top5": shown["top5"], "loss": shown["loss"]}
    return weights_file(meta, raw if raw is not None else state, [state], [posthoc_name(row)],
                        scored, posthoc=posthoc)


def plot(path: Path, rows: list[Row], title: str) -> None:
    """posthoc.png: top-1 and loss against EMA length (sigma_rel, log scale); tracked EMAs as
    stars, the raw weights as a dashed line, poor fits hollow."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("top1", "loss"), ("validation top-1 (%)", "validation loss")):
        for kind, marker, label in (("power", "o", "power EMA (reconstructed)"),
                                    ("exp", "s", "exponential EMA (reconstructed)")):
            chosen = sorted((r for r in rows if r.kind == kind), key=lambda r: r.sigma_rel)
            if not chosen:
                continue
            xs, ys = [r.sigma_rel for r in chosen], [r.result[key] for r in chosen]
            line, = ax.plot(xs, ys, marker=marker, label=label)
            poor = [(x, y) for x, y, r in zip(xs, ys, chosen) if r.fit_error > POOR_FIT]
            if poor:
                ax.plot(*zip(*poor), linestyle="none", marker=marker, markersize=9,
                        markerfacecolor="white", color=line.get_color(),
                        label=f"fit error > {POOR_FIT:.0%}")
        tracked = [r for r in rows if r.kind == "tracked"]
        ax.plot([r.sigma_rel for r in tracked], [r.result[key] for r in tracked], linestyle="none",
                marker="*", markersize=14, color="black", label="tracked EMA (last snapshot)")
        for r in rows:
            if r.kind == "raw":
                ax.axhline(r.result[key], color="grey", linestyle="--", label="raw weights")
            elif r.kind == "ema":
                ax.axhline(r.result[key], color="grey", linestyle=":", linewidth=1,
                           label=f"{r.label} (the run's)")
        ax.set_xscale("log")
        # Plain numbers at a few round lengths: log-scale labels like 3x10^-2 crowd each other.
        lengths = [r.sigma_rel for r in rows if r.sigma_rel is not None]
        ticks = [t for t in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
                 if min(lengths) / 1.3 <= t <= max(lengths) * 1.3]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="EMA length (sigma_rel)", ylabel=name, title=name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def sweep_plan(run_dir: str, sigma_rels, half_lives):
    """The series, its targets and their least-squares solution (no weights read yet)."""
    series = read_series(run_dir)
    targets = targets_for(series, sigma_rels, half_lives)
    solution = solve(series.profiles(), [t.profile for t in targets])
    return series, targets, solution


def remove_stale_outputs(run_dir: Path) -> None:
    """A sweep killed while writing its outputs leaves the temporary file of that write (for
    the best file, as big as the model); the outputs themselves are whole. Only the sweep's own
    names: a training run may be writing its files into the same folder."""
    for name in (CSV, PNG, BEST):
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


def finite_or_fail(states: list[dict], labels: list[str]) -> None:
    for state, label in zip(states, labels):
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise UserError(f"the reconstruction of {label} is not finite: corrupt snapshots?")


def describe(series: Series, targets: list[Target], clamped: int) -> str:
    sigmas = " ".join(f"{s:g}" for s in series.sigma_rels)
    text = (f"post-hoc EMA: {len(series.snapshots)} snapshots ({series.dtype}) of sigma_rel "
            f"{sigmas} up to step {series.snapshots[-1].step}; {len(targets)} reconstructions")
    if clamped:
        text += f"; {clamped} BatchNorm variance element(s) below zero clamped"
    return text


def check_outputs_writable(run_dir: Path) -> None:
    """The sweep's three files can be written into `run_dir`: checked before the sweep, which
    takes minutes, so that a read-only folder is not found out only at its end."""
    for name in (CSV, PNG, BEST):
        if (run_dir / name).is_dir():
            raise UserError(f"cannot write {run_dir / name}: a folder of that name is in the way")
    try:
        fd, probe = tempfile.mkstemp(prefix=".posthoc-write-test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write {CSV}, {PNG} and {BEST} into {run_dir}: "
                        f"{(exc.strerror or str(exc)).lower()}") from None
