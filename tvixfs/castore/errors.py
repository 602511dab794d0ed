"""The one error type of the pure model."""

from tvixfs.errors import UserError


class ValidationError(UserError, ValueError):
    """Input breaks a rule of the protocol; the message says which rule and where."""
