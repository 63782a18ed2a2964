"""The one exception tree of tuneloop.

Everything tuneloop raises on purpose derives from ``TuneloopError``; its
message is one line a user can act on, and the CLI prints exactly that line.

    TuneloopError
    ├── ConfigError          a config file that does not parse or a bad key
    ├── InputError           bad user input: empty text, too long, bad rating word
    ├── NotFoundError        an unknown exchange, version or run id
    ├── StoreError           a database that is not tuneloop's, or a failed migration
    ├── ModelError           a model that cannot be built, downloaded or loaded
    ├── EngineError          the inference engine failed a request
    │   ├── BusyError        the engine's queue is full; try again later
    │   └── CancelledError   the request was cancelled before it finished
    ├── TrainingError        a training run failed or cannot start
    └── PermissionDenied     a non-admin asked for an admin action
"""

from __future__ import annotations


class TuneloopError(Exception):
    """Root of every error tuneloop raises on purpose."""


class ConfigError(TuneloopError):
    """The configuration does not parse, or a key is unknown or invalid."""


class InputError(TuneloopError):
    """User input that tuneloop refuses: empty, too long, or malformed."""


class NotFoundError(TuneloopError):
    """An id (exchange, version, run) that does not exist."""


class StoreError(TuneloopError):
    """The database cannot be used: not a tuneloop database, or too new."""


class ModelError(TuneloopError):
    """A model that cannot be built, downloaded or loaded."""


class EngineError(TuneloopError):
    """The inference engine failed a request."""


class BusyError(EngineError):
    """The engine's queue is full; the request was refused, not queued."""


class CancelledError(EngineError):
    """The request was cancelled before it finished."""


class TrainingError(TuneloopError):
    """A training run failed or cannot start."""


class PermissionDenied(TuneloopError):
    """A user who is not an admin asked for an admin action."""
