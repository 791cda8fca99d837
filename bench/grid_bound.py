#!/usr/bin/env python
"""Stage 2 grid: does a grid finish in less than (TensorFlow import + its fits + 5 s)?

Each round runs, per checkout, `train_head.py --grid ...` as a user would (fresh process, wall clock,
runs recorded in a temporary folder) and then `python -c "import tensorflow"` (median of 3), and
prints the wall time against that bound, the fits' own seconds (from each run's metrics.json) and
the rest. Rounds alternate between checkouts for a before/after on a shared, noisy machine.

    python bench/grid_bound.py [--rounds 5] [--checkout /path/to/old/clone] [-- extra train_head.py options]
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = ("--grid", "lr=1e-3,1e-2", "--grid", "l2=1e-4,1e-3", "--val-split", "0.1")
ALLOWANCE = 5.0  # seconds beyond the import and the fits
IMPORTS = 3  # `import tensorflow` alone varies by +-0.7 s between processes here: the bound takes a median of 3


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise click.ClickException(f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - started


def one_round(checkout: Path, options: tuple[str, ...], cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as runs_dir:
        wall = timed([sys.executable, "train_head.py", *GRID, *options, "--cache-dir", cache_dir,
                      "--runs-dir", runs_dir, "--quiet"], checkout)
        fits = [json.loads(p.read_text())["fit_seconds"] for p in sorted(Path(runs_dir).glob("*/metrics.json"))]
    tf_import = statistics.median(timed([sys.executable, "-c", "import tensorflow"], checkout)
                                  for _ in range(IMPORTS))
    bound = tf_import + sum(fits) + ALLOWANCE
    return {"wall": wall, "import": tf_import, "fits": sum(fits), "runs": len(fits), "bound": bound,
            "rest": wall - tf_import - sum(fits)}


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--checkout", "checkouts", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Other clones to time too (e.g. a worktree of the previous commit); rounds alternate.")
@click.option("--cache-dir", default=str(ROOT / "cache"), show_default=True)
@click.argument("options", nargs=-1, type=click.UNPROCESSED)
def main(rounds, checkouts, cache_dir, options):
    from featcache import cpu

    roots = [ROOT, *map(Path, checkouts)]
    results: dict[Path, list[dict]] = {root: [] for root in roots}
    for _ in range(rounds):
        for root in roots:
            r = one_round(root, options, cache_dir)
            results[root].append(r)
            verdict = "met" if r["wall"] < r["bound"] else "MISSED"
            print(f"{root}: wall {r['wall']:.2f} s, bound {r['bound']:.2f} s ({verdict}); "
                  f"import {r['import']:.2f} s, {r['runs']} fits {r['fits']:.2f} s, rest {r['rest']:.2f} s", flush=True)
    print(f"CPU: {cpu.name()} ({cpu.noted_flags()}); grid {' '.join(GRID + tuple(options))}; medians of {rounds}:")
    for root, rows in results.items():
        met = sum(r["wall"] < r["bound"] for r in rows)
        print(f"  {root}: wall {statistics.median(r['wall'] for r in rows):.2f} s, "
              f"bound {statistics.median(r['bound'] for r in rows):.2f} s, met {met}/{len(rows)}; "
              f"rest (wall - import - fits) {statistics.median(r['rest'] for r in rows):.2f} s "
              f"({' / '.join(format(r['rest'], '.2f') for r in rows)}), allowed {ALLOWANCE:.0f} s")


if __name__ == "__main__":
    main()
