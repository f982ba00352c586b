"""Errors shared by the engine, the model families and the router."""

from __future__ import annotations


class InputError(ValueError):
    """A request the engine cannot run as given (the HTTP layer maps it to 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
