"""The few exceptions edgecam raises on purpose.

Library errors (GStreamer, ONNX Runtime, pydantic, OS) are wrapped into one of these with
``raise ... from exc`` and a message that tells the user what to do next.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EdgecamError",
    "LiveViewError",
    "MissingPluginError",
    "ModelError",
    "PipelineError",
    "SourceError",
    "UsageError",
]


class EdgecamError(Exception):
    """Base class of every error edgecam raises on purpose."""


class ConfigError(EdgecamError):
    """The configuration file or environment holds a bad key or value."""


class ModelError(EdgecamError):
    """A model file is missing, unreadable or has an unexpected layout."""


class MissingPluginError(EdgecamError):
    """A GStreamer element the pipeline needs is not installed."""


class SourceError(EdgecamError):
    """A video source cannot be opened or stopped delivering frames."""


class PipelineError(EdgecamError):
    """The media pipeline failed while running."""


class LiveViewError(EdgecamError):
    """The live view cannot take a viewer (stopped, or at its viewer limit)."""


class UsageError(EdgecamError):
    """A command-line argument is wrong in a way its parser cannot see (an output that is the
    input, a folder where a file is wanted). The command exits with status 2."""
