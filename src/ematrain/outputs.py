"""The run directory: args.yaml, summary.csv and curves.png, each written atomically."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import yaml

from .checkpoint import atomic_write, atomic_write_text
from .errors import UserError

METRICS = ("loss", "top1", "top5")


def make_run_dir(output: str, experiment: str, model: str, resuming: bool = False,
                 path: Path | None = None) -> Path:
    """`<output or ./output>/train/<experiment or date-model>/`, created if needed.

    A new run never writes into an earlier run's folder: like timm, it takes `<name>-1`,
    `<name>-2`, ... instead. A resumed run continues in its own folder.
    """
    name = experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{model.replace('/', '_')}"
    base = path or Path(output or "output") / "train" / name
    name = base.name
    run_dir = base
    suffix = 0
    while not resuming and run_dir.exists() and any(run_dir.iterdir()):
        suffix += 1
        run_dir = base.with_name(f"{name}-{suffix}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {run_dir}: {exc.strerror}") from None
    if resuming:
        # A run killed during a save leaves its temporary file behind; the real file is whole.
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    probe = run_dir / ".write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {run_dir} is not writable: {exc.strerror}") from None
    return run_dir


def write_args(run_dir: Path, args: dict) -> None:
    """args.yaml, loadable again with `-c` (the data root is kept as data_dir)."""
    # A recipe, not the run's history: `-c args.yaml` must start a new run, never resume this one.
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()
             if k not in ("config", "resume")}
    if clean.get("data_dir"):
        # Absolute, so `-c args.yaml` works from any directory.
        clean["data_dir"] = str(Path(clean["data_dir"]).resolve())
    atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(clean, sort_keys=True))


def ema_column_prefixes(decays: list[float]) -> list[str]:
    """Column-group prefixes per EMA: timm's `ema_` for the first, `ema<decay>_` for the rest."""
    if not decays:
        return []
    return ["ema_"] + [f"ema{d:g}_" for d in decays[1:]]


def summary_columns(decays: list[float]) -> list[str]:
    cols = ["epoch", "lr", "train_loss"] + [f"eval_{m}" for m in METRICS]
    for prefix in ema_column_prefixes(decays):
        cols += [f"{prefix}eval_{m}" for m in METRICS]
    return cols


def summary_row(epoch: int, lr: float, train_loss: float, results: list[dict],
                decays: list[float]) -> dict:
    row = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
    for m in METRICS:
        row[f"eval_{m}"] = results[0][m]
    for prefix, res in zip(ema_column_prefixes(decays), results[1:]):
        for m in METRICS:
            row[f"{prefix}eval_{m}"] = res[m]
    return row


def write_summary(run_dir: Path, rows: list[dict], columns: list[str]) -> None:
    """Rewrite summary.csv whole: a resumed run never duplicates or loses a row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    atomic_write_text(run_dir / "summary.csv", buf.getvalue())


def read_summary(run_dir: Path) -> list[dict]:
    path = run_dir / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_curves(run_dir: Path, rows: list[dict], decays: list[float]) -> None:
    """curves.png: top-1 and loss per epoch for the raw weights and every EMA."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    series = [("raw", "")] + [
        (f"EMA {d:g}", prefix) for d, prefix in zip(decays, ema_column_prefixes(decays))]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, prefix in series:
        ax_acc.plot(epochs, [float(r[f"{prefix}eval_top1"]) for r in rows], marker="o", label=label)
        ax_loss.plot(epochs, [float(r[f"{prefix}eval_loss"]) for r in rows], marker="o", label=label)
    ax_acc.set(title="validation top-1", xlabel="epoch", ylabel="top-1 (%)")
    ax_loss.set(title="validation loss", xlabel="epoch", ylabel="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / "curves.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
