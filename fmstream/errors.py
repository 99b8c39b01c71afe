"""The error tree of ``fmstream`` (CLI, settings, wiring): one base class, one subclass per kind
of failure.

Messages say what was expected, what arrived and what to do. A type that replaces a plain
``ValueError`` or ``RuntimeError`` also subclasses it, so callers that caught those still do.
"""

from __future__ import annotations


class FmstreamError(Exception):
    """Base of every error raised by ``fmstream``."""


class PriorityError(FmstreamError, ValueError):
    """A niceness or scheduler time slice the process may not ask for (``FMSTREAM_TRAINER_NICE``,
    ``FMSTREAM_WORKER_SLICE_US``)."""


class CredentialWatchError(FmstreamError, ValueError):
    """A credential watch was given a check interval or refusal count it cannot work with."""


class NoSamplesError(FmstreamError, ValueError):
    """A lag window produced no sample to plot."""


__all__ = ["CredentialWatchError", "FmstreamError", "NoSamplesError", "PriorityError"]
