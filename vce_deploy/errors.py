"""One exception family for everything vce_deploy refuses.

Every message names what was expected and what came, so a caller can fix the input
without reading our source.
"""


class VCEError(Exception):
    """Base class of every error vce_deploy raises on purpose."""


class InputError(VCEError, ValueError):
    """An image, array or argument handed to the runtime is not what the API accepts."""


class BundleError(VCEError):
    """A bundle is missing, tampered with, or does not describe its own files truthfully."""


class CheckpointError(VCEError):
    """A checkpoint is missing, not safetensors, or does not match the requested config."""


class BackendError(VCEError):
    """A backend cannot be used here (not installed, no GPU, unknown name)."""


class EngineMismatchError(BackendError):
    """A TensorRT engine was built for another TensorRT version or GPU."""


class OverloadedError(VCEError):
    """A bounded request queue is full (or closing): try again later instead of growing memory."""


class RequestTimeoutError(VCEError, TimeoutError):
    """A request waited or ran past its deadline and was dropped."""


class DependencyError(VCEError, ImportError):
    """An optional package that a feature needs is not installed (the message names it)."""
