"""The one error type of the pure model."""


class ValidationError(ValueError):
    """Input breaks a rule of the protocol; the message says which rule and where."""
