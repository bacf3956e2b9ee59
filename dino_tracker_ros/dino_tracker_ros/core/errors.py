"""Errors a user can cause. Nodes turn them into ``success: false``; the CLI into exit code 2."""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "ClipError",
    "ConfigError",
    "DinoTrackerError",
    "NotTrainedError",
    "QueryError",
    "StorageError",
    "WeightsError",
]


class DinoTrackerError(Exception):
    """Base of every error a user can cause; the message is one line saying what to do."""


class ConfigError(DinoTrackerError):
    """A configuration value is missing, malformed or out of range."""


class ClipError(DinoTrackerError):
    """A clip is unknown, unreadable, malformed, or cannot be written."""


class WeightsError(DinoTrackerError):
    """Backbone or flow weights are missing or do not match the architecture."""


class NotTrainedError(DinoTrackerError):
    """A clip has no trained model (or no preprocessing) yet."""


class QueryError(DinoTrackerError):
    """A query point lies outside the image or the clip's frame range, or is not finite."""


class Cancelled(DinoTrackerError):
    """A long job was cancelled cooperatively through its :class:`~.progress.CancelToken`."""


class StorageError(DinoTrackerError, OSError):
    """A file could not be written: disk full, read-only file system, no permission, file
    size limit. Also an :class:`OSError` (``errno`` is the original one), so code that
    handles OS errors keeps working; nothing half-written is left in place."""
