"""What every benchmark prints about the machine it ran on (shared by the bench_* scripts)."""
from __future__ import annotations

import os


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo, where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None


def load_line(note: str = "other work on the machine adds noise") -> str | None:
    """``load avg : 1.80 1.26 1.59 (1, 5, 15 min; NOTE)``, where the system reports it."""
    if not hasattr(os, "getloadavg"):
        return None
    return "load avg : {:.2f} {:.2f} {:.2f} (1, 5, 15 min; {})".format(*os.getloadavg(), note)
