"""edgecam: an open smart camera. Python steers, C moves pixels."""

from edgecam.config import Settings, load_settings
from edgecam.errors import (
    ConfigError,
    EdgecamError,
    MissingPluginError,
    ModelError,
    PipelineError,
    SourceError,
)

__all__ = [
    "ConfigError",
    "EdgecamError",
    "MissingPluginError",
    "ModelError",
    "PipelineError",
    "Settings",
    "SourceError",
    "load_settings",
]
__version__ = "0.1.0"
