"""The image files given to predict: paths expanded (folders to their images), each decoded as extraction does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..extract.sources.folder import decode_file, is_image_name


def decode_image(path: Path) -> np.ndarray:
    """An image file of any format extraction reads (folder.IMAGE_FORMATS), size and mode (gray, RGB, RGBA) ->
    uint8 [H, W, 3], decoded as extraction does."""
    image, reason = decode_file(Path(path))
    if image is None:
        raise UserError(f"cannot read image: {reason}")
    return image


def expand_paths(paths) -> list[Path]:
    """Files as given; folders become their image files, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if is_image_name(f.name))
        else:
            out.append(p)
    return out
