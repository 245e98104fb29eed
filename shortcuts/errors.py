"""Typed errors of the library. All are ValueError subclasses, so callers that only know
ValueError still catch them; the service maps each one to an HTTP status."""

from __future__ import annotations


class OnejumpError(ValueError):
    """Base class: a problem the user can fix, with a message that says how."""


class AssetError(OnejumpError):
    """A model or data asset could not be fetched or failed its checksum."""


class CorpusError(OnejumpError):
    """A corpus file is missing, unreadable or empty."""


class UnsupportedModelError(OnejumpError):
    """The model's architecture is not one the adapter knows."""


class ArtifactError(OnejumpError):
    """A jump artifact is corrupt, or was trained for another model."""


class Cancelled(Exception):  # noqa: N818 (a stop asked for, not an error of the caller's)
    """Work stopped between two chunks because its caller asked (a client that left, a shutdown)."""
