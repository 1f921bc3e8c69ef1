"""Memory-store errors; all derive from the project's MemoryStoreError."""

from agents.errors import MemoryStoreError


class WriterLockedError(MemoryStoreError):
    """Another live process holds the embedded store open for writing."""


class UnknownIdError(MemoryStoreError):
    """A rule or episode id that the store does not hold."""


class BadFilterError(MemoryStoreError):
    """A where-filter with an unknown key, operator or value type."""


class ReadOnlyError(MemoryStoreError):
    """A write was attempted on a store opened with writable=False."""


__all__ = ["MemoryStoreError", "WriterLockedError", "UnknownIdError", "BadFilterError", "ReadOnlyError"]
