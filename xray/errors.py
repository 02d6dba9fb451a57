"""Errors a user can fix: the CLI and the HTTP layers turn them into one clear line."""


class XrayError(Exception):
    """Bad input or configuration: reported as one line, exit code 2, no traceback."""


class ConfigError(XrayError):
    """A config file or override is unknown, mistyped or out of range."""


class DataError(XrayError):
    """A dataset is missing, unreadable, too small or inconsistent."""


class SourceError(DataError):
    """A remote data source (S3) refused or could not be reached."""


class RunError(XrayError):
    """A run id is unknown or a run directory is damaged."""


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can read (the decoders in xray/data/preprocessing.py and xray/data/dicom.py)."""


class ImageTooLargeError(ImageDecodeError):
    """More pixels than the configured limit: refused before decoding."""
