"""Errors the repositories raise; each message says what went wrong and what to do."""


class StoreError(Exception):
    """Base for expected, caller-actionable store failures."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass
