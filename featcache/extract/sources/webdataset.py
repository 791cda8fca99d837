"""WebDataset tar shards: index one split's uncompressed tar files, then read its samples' images from them.

Layout: `ROOT/train-000000.tar, ...` and `ROOT/test-000000.tar` (names starting with the split), or the tar
files in `ROOT/train/` and `ROOT/test/` (base.split_files). A sample is the members sharing a key (the member's
path up to the first dot of its file name, as the webdataset library splits it): one image (`.jpg`, `.jpeg`,
`.png`, `.webp`, `.bmp`, `.gif`) and its label (`.cls`: an integer; or `.json` with an integer `label` field).
Other members (captions, metadata) are ignored. Class names are the lines of `ROOT/classes.txt` when present,
else the label numbers (0 to the largest label of either split).

Indexing reads the tar headers and the small label members with the standard library's `tarfile`, and refuses
an unusable shard before anything is written; images are then read by offset, never unpacked to disk, and
decoded as encoded.py decodes every source's.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ...errors import UserError
from .base import split_files
from .encoded import OTHER_SPLIT, EncodedSplit, few

SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("bmp", "gif", "jpeg", "jpg", "png", "webp")
CLASSES_FILE = "classes.txt"
BLOCK = 512  # tar's block: the archive ends with (at least) one block of zeros


@dataclass
class Shard:
    """One indexed tar file: its samples' image members (name, data offset, size) and labels, in tar order."""

    path: Path
    relative: str
    size: int
    mtime_ns: int
    members: list
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray


class TarSplit(EncodedSplit):
    """One split of a WebDataset: its tar shards indexed, its samples (a seeded `limit` of them) in tar order."""

    def __init__(self, root, split: str, limit: int | None = None, strict: bool = False):
        self.root, self.split, self.strict = Path(root), split, strict
        names = read_class_names(self.root)
        keep = self._take(names, index_split(self.root, split),
                          lambda: index_split(self.root, OTHER_SPLIT[split], missing_ok=True),
                          lambda shard, row: f"{shard.path}: {shard.members[row]}'s label {shard.labels[row]} is "
                          f"outside the {len(names)} classes of {self.root / CLASSES_FILE} (labels count from 0)",
                          limit)
        self.offsets = np.concatenate([s.offsets for s in self.shards])[keep]
        self.sizes = np.concatenate([s.sizes for s in self.shards])[keep]
        files = [f"{s.relative}:{member}" for s in self.shards for member in s.members]
        self.files = [files[i] for i in keep]

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the class names, every tar's size and mtime, and every sample's member, offset, size and label."""
        h = hashlib.sha256(json.dumps(list(self.class_names)).encode())
        for shard in self.shards:
            h.update(f"{shard.relative}\0{shard.size}\0{shard.mtime_ns}\n".encode())
        h.update("\n".join(self.files).encode())
        for array in (self.offsets, self.sizes, self.labels):
            h.update(array.astype("<i8").tobytes())
        return h.hexdigest()

    def attrs(self) -> dict:
        return {"split_rule": f"{len(self.shards)} tar shards"}

    def _blobs(self, start: int, stop: int) -> Iterator[tuple[int, bytes | None, str]]:
        """(item, its image member's bytes, "") for items [start, stop), one open tar file at a time."""
        for shard, items in itertools.groupby(range(start, stop), lambda item: int(self.shard_of[item])):
            with open(self.shards[shard].path, "rb") as handle:
                for item in items:
                    handle.seek(int(self.offsets[item]))
                    data = handle.read(int(self.sizes[item]))
                    if len(data) < self.sizes[item]:
                        yield item, None, f"member cut short ({len(data)} of {self.sizes[item]} bytes: the tar changed)"
                    else:
                        yield item, data, ""


def read_class_names(root: Path) -> tuple[str, ...] | None:
    """The lines of ROOT/classes.txt (blank ones at the end dropped), or None when there is none."""
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    names = [name.strip() for name in path.read_text(encoding="utf-8").rstrip("\n").split("\n")]
    if not any(names) or not all(names):
        raise UserError(f"{path} must name one class per line (it has {'an empty line' if any(names) else 'none'})")
    return tuple(names)


def index_split(root: Path, split: str, missing_ok: bool = False) -> list[Shard]:
    """The split's indexed shards; a missing or empty split is refused (unless `missing_ok`: then [])."""
    paths = split_files(root, split, SUFFIX)
    if not paths:
        if missing_ok:
            return []
        compressed = split_files(root, split, ".tar.gz") + split_files(root, split, ".tgz")
        hint = f"; {compressed[0].name} is compressed: gunzip the shards first" if compressed else ""
        raise UserError(f"no {split} shards in {root}: expected {split}-*.tar files there (or in {root / split}/)"
                        f"{hint}")
    shards = [index_tar(path, root) for path in paths]
    if not any(len(shard.labels) for shard in shards):
        raise UserError(f"the {split} shards in {root} hold no samples ({few(shards)} are empty)")
    return shards


def index_tar(path: Path, root: Path) -> Shard:
    """One tar's samples, in the order their first members appear; every unusable sample is refused here."""
    stat = path.stat()
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                if member.offset_data + member.size > stat.st_size:
                    raise UserError(f"{path} is truncated: member {member.name} ends at byte "
                                    f"{member.offset_data + member.size:,}, the file at {stat.st_size:,}")
                directory, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot or not stem:
                    continue  # no extension, or a hidden file: not part of a sample
                sample = samples.setdefault(f"{directory}/{stem}" if directory else stem, {"members": []})
                sample["members"].append(member.name)
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    if "image" in sample:
                        raise UserError(f"{path}: sample {stem} has two images ({sample['image'][0]}, {member.name})")
                    sample["image"] = (member.name, member.offset_data, member.size)
                elif extension == "cls" or (extension == "json" and "label" not in sample):
                    label = _label(tar.extractfile(member).read(), extension, f"{path}: {member.name}")
                    if label is not None:
                        sample["label"] = label
            end = tar.offset
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        if "unexpected end" in str(exc):
            raise UserError(f"{path} is truncated: it ends inside a member ({exc})") from None
        raise UserError(f"{path} is not a readable uncompressed tar file ({exc})") from None
    with open(path, "rb") as handle:  # a tar ends with a block of zeros: without it, it was cut between members
        handle.seek(end)
        if handle.read(BLOCK) != bytes(BLOCK):
            raise UserError(f"{path} is truncated: no end-of-archive block after its last member (byte {end:,})")
    for key, sample in samples.items():
        if "image" not in sample:
            what = "its label" if "label" in sample else "its members"
            raise UserError(f"{path}: sample {key} has no image ({', '.join(IMAGE_EXTENSIONS)}), only {what}: "
                            f"{', '.join(sample['members'][:3])}")
        if "label" not in sample:
            raise UserError(f"{path}: {sample['image'][0]} has no label ({key}.cls, or {key}.json with a label field)")
    images = [sample["image"] for sample in samples.values()]
    offsets, sizes = np.array([image[1:] for image in images], np.int64).reshape(-1, 2).T
    labels = np.array([sample["label"] for sample in samples.values()], np.int64)
    return Shard(path, path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns,
                 [image[0] for image in images], offsets, sizes, labels)


def _label(data: bytes, extension: str, where: str) -> int | None:
    """A `.cls` member's integer, or a `.json` member's `label` field (None when it has none)."""
    try:
        text = data.decode("utf-8").strip()
        value = json.loads(text) if extension == "json" else text
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{where} is not {'JSON' if extension == 'json' else 'text'}") from None
    if extension == "json":
        if not isinstance(value, dict) or "label" not in value:
            return None
        value = value["label"]
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 0
                                       or isinstance(value, str) and value.isascii() and value.isdigit()):
        raise UserError(f"{where}: label {str(value)[:40]!r} is not a class number (a whole number from 0)")
    return int(value)

