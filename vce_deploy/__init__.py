"""vce_deploy: one-shot glyph conversion with a Variational Convertor-Encoder.

Importing this package never imports torch (only the eager reference backend, training and
export do) nor any GPU library: backends import their engine when they are loaded.
"""
from .backends import BACKENDS, BackendInfo
from .batching import Batcher
from .converter import Converter, conversion_grid, save_conversions
from .errors import (BackendError, BundleError, CheckpointError, DependencyError, EngineMismatchError, InputError,
                     OverloadedError, RequestTimeoutError, VCEError)
from .grid import save_grid
from .inputs import DEFAULT_N, DEFAULT_TEMPERATURE, preprocess_batch
from .preprocess import IMAGE_SIZE, preprocess

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendError",
    "BackendInfo",
    "Batcher",
    "BundleError",
    "CheckpointError",
    "Converter",
    "DEFAULT_N",
    "DEFAULT_TEMPERATURE",
    "DependencyError",
    "EngineMismatchError",
    "IMAGE_SIZE",
    "InputError",
    "OverloadedError",
    "RequestTimeoutError",
    "VCEError",
    "conversion_grid",
    "preprocess",
    "preprocess_batch",
    "save_conversions",
    "save_grid",
]
