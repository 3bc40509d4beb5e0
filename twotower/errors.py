"""Errors the library raises on purpose, with a message that names the problem."""


class SpecError(ValueError):
    """The model spec cannot be resolved or loaded (missing file, bad shapes, unknown architecture)."""
