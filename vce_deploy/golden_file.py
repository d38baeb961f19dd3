"""The bundle's golden set (golden.npz: x, q, z inputs and eager-PyTorch fp32 outputs), read
from its hashed bytes with allow_pickle=False and checked against the I/O contract. Kept apart
from golden.py (which verifies backends through Converter) so that what loads a backend, as
measuring does (backends/measure.py), can read the inputs without importing Converter."""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

from .bundle import Bundle
from .contract import MODEL_IO, tensor_shapes
from .errors import BundleError

GOLDEN_FILE = "golden.npz"
INPUTS = ("x", "q", "z")
OUTPUTS = tuple(name for io_ in MODEL_IO.values() for name in io_.outputs)  # mu, logvar, y


@dataclass(frozen=True)
class Golden:
    arrays: dict[str, np.ndarray]  # x, q, z inputs; mu, logvar, y eager-PyTorch fp32 outputs

    @property
    def count(self) -> int:
        return self.arrays["x"].shape[0]


def load_golden(bundle: Bundle) -> Golden | None:
    """The bundle's golden set, checked against the I/O contract; None if it has none."""
    found = bundle.entries("golden")
    if not found:
        return None
    entry = found[0]
    where = f"{bundle.path}/{entry.path}"
    data = bundle.read_verified(entry)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise BundleError(f"{where}: expected an .npz of plain float32 arrays, got an unreadable file ({err})") from err
    shapes = tensor_shapes(bundle.manifest.image_size, bundle.manifest.latent_dim)
    want = set(INPUTS + OUTPUTS)
    if set(arrays) != want:
        raise BundleError(f"{where}: expected arrays {sorted(want)}, got {sorted(arrays)}")
    count = arrays["x"].shape[0] if arrays["x"].ndim else 0
    for name, array in arrays.items():
        if array.dtype != np.float32 or array.shape != (count, *shapes[name]) or count < 1:
            raise BundleError(f"{where}: expected {name!r} float32 of shape ({count or 'N >= 1'}, "
                              f"{', '.join(map(str, shapes[name]))}), got {array.dtype} {array.shape}")
        if not np.isfinite(array).all():
            raise BundleError(f"{where}: expected finite values in {name!r}, got NaN or inf")
    return Golden(arrays)
