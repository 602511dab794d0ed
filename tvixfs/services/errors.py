"""Errors a service raises; each maps onto one gRPC status code (see server/ and services/grpc.py)."""

from tvixfs.castore.errors import ValidationError
from tvixfs.errors import UserError


class StoreError(UserError):
    """Base of every error a store service raises on purpose."""


class NotFoundError(StoreError):
    """The requested blob, directory or path info is absent (NOT_FOUND)."""


class InvalidArgumentError(StoreError, ValidationError):
    """The request or the data put is malformed (INVALID_ARGUMENT); nothing was stored."""


class FailedPreconditionError(StoreError):
    """Data refers to content the store does not have (FAILED_PRECONDITION); nothing was stored."""


class PathExistsError(StoreError):
    """A store path is already there with other content (ALREADY_EXISTS); a store path is immutable."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or answered too late (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class CorruptDataError(StoreError):
    """The store returned data that fails verification: wrong digest, bad order, bad message."""
