"""Post-hoc EMA (Karras et al. 2024, EDM2): choose the EMA after training.

* `profiles`: the arithmetic: discrete EMA profiles and their float64 least-squares fit,
  coefficients summing to one (`Profile`, `solve`).
* `snapshots`: the snapshot file (`SNAPSHOT_SCHEMA`, the README's table); `series`: a run's
  snapshots read and checked as one series, forks merged, reconstructions formed.
* `schedule`: the training side: when the power EMAs are snapshotted, and where.
* `selection`: where validate.py --posthoc chooses its best and where it reports it.
* `sweep`: validate.py --posthoc's targets, tables, posthoc.csv/png and best file (the command
  itself is `ematrain.cli.validate`).

``from ematrain.posthoc import Profile, solve``: the names below, imported on use.
"""
from ematrain.util.exports import lazy_exports

_NAMES = {"Profile": ".profiles", "Solution": ".profiles", "solve": ".profiles",
          "SNAPSHOT_SCHEMA": ".snapshots", "read_series": ".series", "synthesize": ".series"}
__all__ = sorted(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, _NAMES)
