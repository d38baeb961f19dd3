"""vce_deploy: one-shot glyph conversion with a Variational Convertor-Encoder.

Importing this package never imports torch; only the eager reference backend, training
and export do.
"""
from .errors import BackendError, BundleError, CheckpointError, EngineMismatchError, InputError, VCEError
from .preprocess import IMAGE_SIZE, preprocess, preprocess_batch

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BundleError",
    "CheckpointError",
    "EngineMismatchError",
    "IMAGE_SIZE",
    "InputError",
    "VCEError",
    "preprocess",
    "preprocess_batch",
]
