"""The error family: every mistake a user can make ends in one of these, never in a traceback.

``aerial-search`` turns any :class:`AerialSearchError` into ``aerial-search CMD: error: ...``
with exit status 2 (exit status 1 stays for an ingest that finished with failed images).
Messages name the file or setting at fault and the fix. Each subclass also derives from the
builtin its callers expect (``ValueError`` for bad values, ``RuntimeError`` for a missing
resource), so ``except ValueError`` in user code keeps working.

A leaf module: it imports nothing of ours.
"""

from __future__ import annotations


class AerialSearchError(Exception):
    """Base class: a user-facing error whose message says what is wrong and what to do."""


class ConfigError(AerialSearchError, ValueError):
    """A setting is unknown or out of range; the message names the key and the fix."""


class RasterError(AerialSearchError, ValueError):
    """An input image cannot be used; the message names the file and what to do."""


class StoreError(AerialSearchError, ValueError):
    """The path is not a fingerprint store this version understands, or cannot be written."""


class WeightsError(AerialSearchError, RuntimeError):
    """Weights cannot be had or do not fit the backbone; the message says how to supply them."""


class SearchError(AerialSearchError, ValueError):
    """A query cannot be answered; the message says why and what to do."""


class PostprocessError(AerialSearchError, ValueError):
    """A post-processing cannot be fitted as asked (e.g. more PCA dimensions than the data allow)."""


class ClusterError(AerialSearchError, RuntimeError):
    """The scheduler asked for cannot be started or reached (missing package, no GPU, no address)."""


class DatasetError(AerialSearchError, ValueError):
    """A labelled dataset folder (``evaluate``) is missing or not in the folder-per-class layout."""
