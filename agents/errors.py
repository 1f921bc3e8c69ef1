"""The project's exception hierarchy: every error we raise on purpose derives from SelfImproveError."""


class SelfImproveError(Exception):
    """Base class for errors the project raises deliberately, with a message fit for a user."""


class ModelLoadError(SelfImproveError):
    """A model spec could not be resolved to a usable model (missing, corrupt or unknown)."""


class AdapterError(SelfImproveError):
    """The adapter bank or router was used or configured wrongly."""


class AdapterFileError(AdapterError):
    """Saved adapter files are missing, corrupt or do not match the model."""


class TrainingError(SelfImproveError):
    """A training step was refused (non-finite loss or gradient, empty batch)."""


class MemoryStoreError(SelfImproveError):
    """The rule/episode memory was used wrongly or its files are unusable."""


class DataError(SelfImproveError):
    """An input data file or record is malformed."""


def one_line(err: BaseException) -> str:
    """The first line of an exception, so ModelLoadError messages stay one line."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
