"""The error tree of ``model``: one base class, one subclass per kind of failure.

Messages say what was expected, what arrived and, where it helps, what to do about it.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base of every error raised by ``model``."""


class SchemaError(ModelError):
    """A feature schema (TOML file or ``FieldSpec``) is invalid; names the file and field."""


class FeatureError(ModelError, ValueError):
    """A feature value cannot be encoded for its field (wrong type, unparsable number, ...)."""


class CheckpointError(ModelError):
    """A checkpoint is corrupt, truncated, of an unknown version, or cannot be written."""


class SnapshotError(ModelError):
    """Serialised model data (e.g. ``ContextTable.from_bytes``) is corrupt or truncated."""


class ConfigError(ModelError, ValueError):
    """A ``TrainConfig`` hyper-parameter is out of range."""


class InputError(ModelError, ValueError):
    """Arguments of a model call do not fit together (lengths, label values, timestamps)."""
