"""Error types the orchestration treats differently: data errors are never retried."""

from __future__ import annotations


class NestcastError(Exception):
    """Base of every error nestcast raises on purpose."""


class DataValidationError(NestcastError):
    """Input data is unusable as a whole (unreadable file, missing columns, empty, bad encoding).

    The message names the file, the failed expectations and a few offending values.
    Retrying cannot help, so the Prefect tasks fail at once on it.
    """


class UnsafePathError(DataValidationError):
    """A path taken from outside (an object key, a manifest entry, a raw file's name) that would lead out of the
    folder it belongs in: ``..``, an absolute path, either percent-encoded, a link out. Refused before anything
    is written or deleted; the message names it. A data error: retrying cannot help.
    """


class ExportCheckError(NestcastError):
    """A submission frame failed a check before it was written."""


class ModelIntegrityError(NestcastError):
    """A stage's model file is not the one it wrote (its sha256 differs from ``metadata.json``) or unreadable.

    The flow's cache check treats such a model as a missing output, so a rerun retrains the stage.
    """


class DeviceUnavailableError(NestcastError):
    """The configured device (``device=gpu``) is not visible."""


class StoreError(NestcastError):
    """The data directory's object store cannot be used as configured (no such bucket, no filesystem for the URL).

    A store that answers with an error now and then is an ``OSError`` instead, and retried.
    """


#: Exceptions that a retry cannot fix.
NON_RETRYABLE: tuple[type[BaseException], ...] = (
    DataValidationError,
    ExportCheckError,
    DeviceUnavailableError,
    StoreError,
    ValueError,
    KeyError,
    TypeError,
)
