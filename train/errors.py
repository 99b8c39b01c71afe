"""The error tree of ``train`` (the trainer process): one base class, one subclass per kind of
failure.

Messages say what was expected, what arrived and what to do. A type that replaces a plain
``ValueError`` or ``RuntimeError`` also subclasses it, so callers that caught those still do
(``train.fetch.FetchFailed``, ``LeaseLost``, ``PublisherFailed`` live beside the code that raises
them and derive from :class:`TrainError` too).
"""

from __future__ import annotations


class TrainError(Exception):
    """Base of every error raised by ``train``."""


class TrainConfigError(TrainError, ValueError):
    """A trainer setting is out of range (``TrainerConfig`` fields, collector thresholds)."""


class CheckpointBusy(TrainError, RuntimeError):
    """A background checkpoint was started while another one still runs (one at a time)."""


__all__ = ["CheckpointBusy", "TrainConfigError", "TrainError"]
