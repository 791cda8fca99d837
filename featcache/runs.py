"""Run records: open the caches a run needs, train a head, and keep everything under runs/<id>/.

A run folder holds config.json (head settings and the caches used), metrics.json,
history.json, head.keras and test_probs.npy, so experiments can be compared later
without retraining.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from . import store
from .errors import UserError
from .head import Features, HeadConfig, train


def extract_command(key: store.CacheKey, split: str, cache_dir) -> str:
    """The extract.py command that builds the cache this key names."""
    from .extractor import DEFAULT_MODEL, DEFAULT_RESIZE

    parts = ["python extract.py", f"--split {split}"]
    if key.model != DEFAULT_MODEL:
        parts.append(f"--model {key.model}")
    if key.image_size != 224:
        parts.append(f"--image-size {key.image_size}")
    if key.resize != DEFAULT_RESIZE:
        parts.append(f"--resize {key.resize}")
    if key.views != "flip":
        parts.append(f"--views {key.views}")
    if key.limit:
        parts.append(f"--limit {key.limit}")
    parts.append(f"--cache-dir {cache_dir}")
    return " ".join(parts)


def load_features(key: store.CacheKey, split: str, cache_dir, views: tuple[str, ...]) -> tuple[Features, dict]:
    """Read one complete cache; a missing one names the command that makes it."""
    path = key.path(cache_dir, split)
    if not path.exists():
        hint = " (an interrupted extraction is waiting to resume)" if store.partial_path(path).exists() else ""
        raise UserError(f"no {split} cache at {path}{hint}; run: {extract_command(key, split, cache_dir)}")
    state = store.inspect(path, key.attrs(split))
    if state.status != "complete":
        raise UserError(f"{split} cache {path} cannot be used: {state.reason}; rebuild it with "
                        f"{extract_command(key, split, cache_dir)} --force")
    embeddings, labels, attrs = store.read(path, key.attrs(split), views)
    return Features(embeddings, labels), {"path": str(path), "fingerprint": attrs["source_fingerprint"],
                                          "engine": attrs.get("engine", ""), "rows": int(attrs["rows"])}


def new_run_dir(runs_dir) -> Path:
    runs_dir = Path(runs_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        run_dir = runs_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write runs folder {runs_dir}: {exc.strerror}") from None
    raise UserError(f"too many runs started at {stamp} in {runs_dir}")


def run_experiment(key: store.CacheKey, cache_dir, runs_dir, config: HeadConfig, verbose: int = 0) -> tuple[Path, dict]:
    """Train one head on the cached train split, score it on test, and record the run."""
    config.check()
    views = config.views_needed()
    train_features, train_info = load_features(key, "train", cache_dir, views)
    test_features, test_info = load_features(key, "test", cache_dir, views)
    run_dir = new_run_dir(runs_dir)  # made before training, so an unwritable runs/ fails fast
    trained = train(train_features, test_features, config, verbose=verbose)
    record = {"head": config.to_dict(), "cache": {**key.attrs("")}, "train_cache": train_info,
              "test_cache": test_info}
    record["cache"].pop("split")
    _write_json(run_dir / "config.json", record)
    _write_json(run_dir / "metrics.json", trained.metrics)
    _write_json(run_dir / "history.json", trained.history)
    trained.model.save(run_dir / "head.keras")
    np.save(run_dir / "test_probs.npy", trained.test_probs.astype(np.float32))
    return run_dir, trained.metrics


def _write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
