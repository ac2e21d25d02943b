"""Errors a user can cause. Each message says what was wrong and how to fix it."""


class XMGIEInputError(ValueError):
    """Bad input to an xMGIE function or node (shapes, empty masks, missing files, ...)."""
