"""The one exception family of xmsearch.

Every error a user can meet is an :class:`XmsearchError`; its message names the input,
the step that refused it and, where there is one, the fix.  The CLI turns these into a
one-line message and a non-zero exit code instead of a traceback.
"""


class XmsearchError(Exception):
    """Base class of every error xmsearch raises on purpose."""


class InputError(XmsearchError, ValueError):
    """A text, image, catalogue row or argument that cannot be used as given."""


class ModelError(XmsearchError):
    """A model could not be built, loaded, exported or failed a parity check."""


class IndexStoreError(XmsearchError):
    """A FAISS index / metadata store is missing, corrupt, or does not match."""


class ServerError(XmsearchError):
    """The Triton server could not be started, reached, or refused a request."""


class ConfigError(XmsearchError):
    """A generated or user-supplied configuration is inconsistent."""


class CheckpointError(XmsearchError):
    """A fusion checkpoint is missing, tampered with, or does not match the encoders."""


def for_caller(exc: BaseException) -> BaseException:
    """The error to raise in one of several callers whose rows failed in one shared request.

    An xmsearch error is copied (same type and message, the shared one as its cause) so
    that each caller's traceback is its own; anything else is handed on as it is.
    """
    if not isinstance(exc, XmsearchError):
        return exc
    try:
        copy = type(exc)(str(exc))
    except TypeError:  # a subclass with another constructor: share it
        return exc
    copy.__cause__ = exc
    return copy
