"""README.md's post-hoc "Defaults, measured" figures are the arithmetic's: the block between its
marker lines is what ``benchmarks/bench_posthoc.py --fit`` prints, recomputed here (no training:
the post-hoc solve on the default series and float64 power EMAs of a random walk), to half a
unit of each printed digit, and every figure the paragraph above it quotes is the block's."""
from __future__ import annotations

import importlib.util
import sys
from decimal import Decimal

import pytest
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_posthoc",
                                                  REPO_ROOT / "benchmarks" / "bench_posthoc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_posthoc", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def readme(bench) -> tuple[str, list[list[str]], list[list[str]]]:
    """The README's text and its fit and dtype tables (rows of cells, header first)."""
    text = (REPO_ROOT / "README.md").read_text()
    assert text.count(bench.BLOCK_BEGIN) == 1 and text.count(bench.BLOCK_END) == 1
    block = text[text.index(bench.BLOCK_BEGIN):text.index(bench.BLOCK_END)]
    tables, rows = [], None
    for line in block.splitlines():
        if line.startswith("|"):
            if rows is None:
                rows = []
                tables.append(rows)
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        else:
            rows = None
    assert len(tables) == 2
    return text, tables[0], tables[1]


def assert_printed(cell: str, value: float, what: str) -> None:
    """`cell` is `value` rounded to its last printed digit (half a unit, and a hair for the
    BLAS a machine has)."""
    unit = float(Decimal(10) ** Decimal(cell).as_tuple().exponent)
    assert abs(float(cell) - value) <= 0.5 * unit * (1 + 1e-6) + 1e-12 * abs(value), \
        f"README says {cell} for {what}; the arithmetic gives {value:.6g}: run " \
        f"`python benchmarks/bench_posthoc.py --fit` and paste its output between the markers"


def test_the_fit_table_is_the_solves(bench, readme):
    _, table, _ = readme
    sweep, rows = bench.fit_rows()
    assert table[0] == ["snapshots", *[f"{s:g}" for s in sweep], "gain"]
    assert [int(r[0]) for r in table[1:]] == [count for count, _, _ in rows]
    for cells, (count, errors, gain) in zip(table[1:], rows):
        for cell, sigma, error in zip(cells[1:-1], sweep, errors):
            assert_printed(cell, 100 * error, f"the fit of sigma_rel {sigma:g} from {count}")
        assert_printed(cells[-1], gain, f"the gain with {count} snapshots")


def test_the_dtype_table_is_the_rounding_of_each_dtype(bench, readme):
    import torch
    _, _, table = readme
    assert table[0] == ["snapshots", "dtype", *map(str, bench.DTYPE_TARGETS)]
    walk = bench.drifting_walk()
    measured = {}
    for count in bench.DTYPE_COUNTS:
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        for dt, errors in bench.dtype_errors(walk, count, dtypes).items():
            measured[(str(count), str(dt).removeprefix("torch."))] = errors
    assert [tuple(r[:2]) for r in table[1:]] == list(measured)
    for cells in table[1:]:
        for cell, sigma, error in zip(cells[2:], bench.DTYPE_TARGETS, measured[tuple(cells[:2])]):
            assert_printed(cell, error, f"{cells[1]} x {cells[0]} at sigma_rel {sigma}")


def _sci(cell: str) -> str:
    """1.7e-03 as the prose writes it: 1.7e-3."""
    mantissa, exponent = cell.split("e")
    return f"{mantissa}e{int(exponent)}"


def test_the_paragraph_quotes_the_tables(bench, readme):
    text, fit, dtype = readme
    paragraph = " ".join(text[text.index("- **Defaults, measured**"):
                              text.index(bench.BLOCK_BEGIN)].split())
    sweep = [float(s) for s in fit[0][1:-1]]
    by_count = {int(r[0]): r[1:] for r in fit[1:]}

    def worst_from(count: int, low: float = 0.024) -> tuple[str, float]:
        """The largest fit error of `count` snapshots from sigma_rel `low` up, and where."""
        cell, sigma = max(((c, s) for s, c in zip(sweep, by_count[count][:-1]) if s >= low),
                          key=lambda x: float(x[0]))
        return cell + "%", sigma
    assert worst_from(32)[1] == sweep[-1]
    row = {tuple(r[:2]): dict(zip(dtype[0][2:], r[2:])) for r in dtype[1:]}
    f16, bf16, f32 = row["32", "float16"], row["32", "bfloat16"], row["32", "float32"]
    f16_long = max((f16[k] for k in ("0.05", "0.0921", "0.179")), key=float)
    claims = [
        (f"32 snapshots the default sweep fits within {worst_from(32)[0]} from sigma_rel 0.024 "
         f"up (the worst at {sweep[-1]:g}, its longest; {worst_from(64)[0]} with 64, "
         f"{worst_from(16)[0]} with 16, {worst_from(8)[0]} with 8)"),
        f"({by_count[32][0]}% at {sweep[0]:g} with 32)",
        f"sum of |c| up to {by_count[32][-1]} with 32 snapshots, {by_count[64][-1]} with 64",
        (f"off by {_sci(f16['0.0243'])} of the weights' norm at sigma_rel 0.024 "
         f"({_sci(f16['0.0125'])} at 0.0125, at most {_sci(f16_long)} from 0.05 up)"),
        (f"from bfloat16 by {_sci(bf16['0.0243'])} ({_sci(bf16['0.0125'])}), from float32 by "
         f"{_sci(f32['0.0243'])} ({_sci(f32['0.0125'])})"),
    ]
    for claim in claims:
        assert claim in paragraph, f"README's paragraph should say: {claim}"


def test_the_fit_does_not_depend_on_the_runs_length(bench, readme):
    """What the paragraph says of the table at 3,200 updates holds at 100,000 within 1%."""
    text, _, _ = readme
    assert "(the same within 1% at 100,000 updates)" in " ".join(text.split())
    _, short = bench.fit_rows(counts=(32,))
    _, long = bench.fit_rows(updates=100_000, counts=(32,))
    assert abs(long[0][1] / short[0][1] - 1).max() < 0.01
