"""Parquet files of image bytes and labels (the Hugging Face datasets layout): index one split, read its images.

Layout: `ROOT/data/train-00000-of-00004.parquet, ...` (the Hub's), or names starting with the split in ROOT,
or the Parquet files in `ROOT/train/` and `ROOT/test/` (base.split_files). Each row is an item: its image
column holds the encoded image as `datasets` writes it (a struct of `bytes` and `path`) or as plain binary,
its label column an integer. The columns are `image` and `label`, else the only column that the schema's
Hugging Face metadata marks as an `Image` / `ClassLabel` feature, unless named by the caller. Class names are
the label column's `ClassLabel` names when the metadata has them, else the label numbers (0 to the largest
label of either split).

Indexing reads each file's footer and its label column only, and refuses an unusable file before anything is
written; images are read row group by row group, READ_ROWS rows at a time, and decoded as encoded.py decodes
every source's. pyarrow is optional (requirements-parquet.txt).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import UserError, first_line
from ...settings import IMAGE_COLUMN, LABEL_COLUMN
from .base import split_files
from .encoded import OTHER_SPLIT, EncodedSplit, few

SUFFIX = ".parquet"
READ_ROWS = 64  # rows of image bytes read at a time from a row group
HF_METADATA = b"huggingface"


@dataclass
class ParquetShard:
    """One indexed Parquet file: rows per row group, its labels, and what its fingerprint covers."""

    path: Path
    relative: str
    group_rows: list
    labels: np.ndarray
    summary: str


class ParquetSplit(EncodedSplit):
    """One split of a Parquet dataset: its files indexed, its rows (a seeded `limit` of them) in file order."""

    def __init__(self, root, split: str, limit: int | None = None, strict: bool = False,
                 image_column: str | None = None, label_column: str | None = None):
        try:
            import pyarrow
            import pyarrow.parquet
        except ImportError:
            raise UserError("reading Parquet needs pyarrow, which is not installed: "
                            "pip install -r requirements-parquet.txt") from None
        self.pa, self.pq = pyarrow, pyarrow.parquet
        self.root, self.split, self.strict = Path(root), split, strict
        paths = self._paths(split)
        self.image_column, self.label_column, names = self._columns(paths[0], image_column, label_column)
        shards = [self._index(path) for path in paths]
        if not sum(len(shard.labels) for shard in shards):
            raise UserError(f"the {split} Parquet files in {self.root} hold no rows ({few(shards)})")
        keep = self._take(names, shards,
                          lambda: [self._index(path) for path in self._paths(OTHER_SPLIT[split], missing_ok=True)],
                          lambda shard, row: f"{shard.path}: row {row} has label {shard.labels[row]}, outside the "
                          f"{len(names)} ClassLabel names of column {self.label_column!r}", limit)
        self.row_in_file = np.concatenate([np.arange(len(s.labels), dtype=np.int64) for s in shards])[keep]
        self.group_of = np.concatenate([np.repeat(np.arange(len(s.group_rows), dtype=np.int64), s.group_rows)
                                        for s in shards])[keep]
        self.files = [f"{shards[f].relative}:{r}" for f, r in zip(self.shard_of.tolist(), self.row_in_file.tolist())]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the class names, the columns, every file's size, mtime and footer, and the rows' labels."""
        h = hashlib.sha256(json.dumps([list(self.class_names), self.image_column, self.label_column]).encode())
        for shard in self.shards:
            h.update(shard.summary.encode())
        h.update("\n".join(self.files).encode())
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def attrs(self) -> dict:
        """The columns read (the key's `image_column` and `label_column` attributes record those named)."""
        return {"split_rule": f"{len(self.shards)} Parquet files",
                "columns_read": json.dumps([self.image_column, self.label_column])}

    def _name(self, item: int) -> str:
        return f"{self.shards[self.shard_of[item]].path}: row {self.row_in_file[item]}"

    # --- indexing -----------------------------------------------------------------------------------------------

    def _paths(self, split: str, missing_ok: bool = False) -> list[Path]:
        paths = split_files(self.root, split, SUFFIX)
        if not paths and not missing_ok:
            raise UserError(f"no {split} Parquet files in {self.root}: expected data/{split}-*.parquet or "
                            f"{split}-*.parquet there (or the files in {self.root / split}/)")
        return paths

    def _open(self, path: Path):
        try:
            return self.pq.ParquetFile(path)
        except (self.pa.ArrowException, OSError) as exc:
            raise UserError(f"{path} is not a readable Parquet file ({first_line(exc)})") from None

    def _columns(self, path: Path, image: str | None, label: str | None):
        """The image and label columns (named, else the defaults, else the only Image / ClassLabel feature) and
        the label's ClassLabel names (None without them), from the first file's schema (_index checks each file)."""
        with self._open(path) as parquet:
            schema = parquet.schema_arrow
        features = hf_features(schema)
        image = image or _default(path, schema.names, features, IMAGE_COLUMN, "Image")
        label = label or _default(path, schema.names, features, LABEL_COLUMN, "ClassLabel")
        feature = features.get(label, {})
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        return image, label, tuple(map(str, names)) if names else None

    def _index(self, path: Path) -> ParquetShard:
        """One file's row groups and labels, its columns checked."""
        with self._open(path) as parquet:
            return self._index_open(path, parquet)

    def _index_open(self, path: Path, parquet) -> ParquetShard:
        schema = parquet.schema_arrow
        for column, what, parameter in ((self.image_column, "images", "image_column"),
                                        (self.label_column, "labels", "label_column")):
            if column not in schema.names:
                raise UserError(f"{path} has no column {column!r} for the {what} (its columns: "
                                f"{', '.join(schema.names)}); name it with `{parameter}=NAME`")
        image_type, label_type = schema.field(self.image_column).type, schema.field(self.label_column).type
        if not (self._binary(image_type) or self.pa.types.is_struct(image_type)
                and image_type.get_field_index("bytes") >= 0 and self._binary(image_type.field("bytes").type)):
            raise UserError(f"{path}: column {self.image_column!r} is {image_type}, not encoded images (binary, or a "
                            "struct of bytes and path as the datasets library writes it)")
        if not self.pa.types.is_integer(label_type):
            raise UserError(f"{path}: column {self.label_column!r} is {label_type}, not integer class numbers; name "
                            "the label column with `label_column=NAME`")
        try:
            column = parquet.read(columns=[self.label_column]).column(0)
        except (self.pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: its {self.label_column!r} column cannot be read ({first_line(exc)})") from None
        if column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise UserError(f"{path}: row {row} has no label (column {self.label_column!r} is empty there)")
        labels = column.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            row = int(np.argmax(labels < 0))
            raise UserError(f"{path}: row {row} has label {labels[row]} (a negative label: an unlabelled row?)")
        meta, stat = parquet.metadata, path.stat()
        relative = path.relative_to(self.root).as_posix()
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        columns = [[[g.column(c).file_offset, g.column(c).total_compressed_size] for c in range(g.num_columns)]
                   for g in groups]
        summary = json.dumps([relative, stat.st_size, stat.st_mtime_ns,
                              [[g.num_rows, g.total_byte_size] + chunks for g, chunks in zip(groups, columns)]])
        return ParquetShard(path, relative, [g.num_rows for g in groups], labels, summary)

    def _binary(self, kind) -> bool:
        types = self.pa.types
        return types.is_binary(kind) or types.is_large_binary(kind) or types.is_binary_view(kind)

    # --- reading ------------------------------------------------------------------------------------------------

    def _blobs(self, start: int, stop: int) -> Iterator[tuple[int, bytes | None, str]]:
        """(item, its image bytes, "") or (item, None, why there are none) for items [start, stop), read one row
        group at a time, READ_ROWS rows at a time, one open file at a time."""
        for n, in_file in itertools.groupby(range(start, stop), lambda item: int(self.shard_of[item])):
            shard = self.shards[n]
            with self._open(shard.path) as parquet:
                for group, items in itertools.groupby(in_file, lambda item: int(self.group_of[item])):
                    first = sum(shard.group_rows[:group])  # the group's first row in its file
                    wanted = {int(self.row_in_file[i]) - first: i for i in items}
                    try:
                        yield from self._group_blobs(parquet, group, wanted)
                    except (self.pa.ArrowException, OSError) as exc:
                        raise UserError(f"reading {shard.path} failed ({first_line(exc)})") from None

    def _group_blobs(self, parquet, group: int, wanted: dict) -> Iterator[tuple[int, bytes | None, str]]:
        """The wanted rows of one row group ({row in the group: item}), in order."""
        position, last = 0, max(wanted)
        for batch in parquet.iter_batches(READ_ROWS, row_groups=[group], columns=[self.image_column],
                                          use_threads=False):
            if position > last:
                return
            cells, paths = batch.column(0), [None] * batch.num_rows
            valid = cells.is_valid().to_pylist()
            if self.pa.types.is_struct(cells.type):
                if cells.type.get_field_index("path") >= 0:
                    paths = cells.field("path").to_pylist()
                cells = cells.field("bytes")
            for offset in range(len(cells)):
                if (item := wanted.get(position + offset)) is not None:
                    data = cells[offset].as_py() if valid[offset] else None
                    if data is not None:
                        yield item, data, ""
                    else:
                        named = f" (only a path: {paths[offset]})" if paths[offset] else ""
                        yield item, None, f"no image bytes{named}"
            position += len(cells)


def hf_features(schema) -> dict:
    """The Hugging Face `datasets` features the schema's metadata records ({column: {"_type": ...}}), or {}."""
    raw = (schema.metadata or {}).get(HF_METADATA)
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return {name: value for name, value in features.items() if isinstance(value, dict)} \
        if isinstance(features, dict) else {}


def _default(path: Path, names: list, features: dict, default: str, feature: str) -> str:
    """`default` when the file has it, else the only column of this Hugging Face feature type, else `default`."""
    if default in names:
        return default
    typed = [name for name, value in features.items() if value.get("_type") == feature and name in names]
    if len(typed) > 1:
        parameter = "image_column" if feature == "Image" else "label_column"
        raise UserError(f"{path} has several {feature} columns ({', '.join(typed)}) and none named {default!r}; "
                        f"choose one with `{parameter}=NAME`")
    return typed[0] if typed else default
