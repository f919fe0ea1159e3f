"""The one exception type for errors a user can cause (bad path, bad CSV, bad image, exhausted budget)."""


class RetuneError(Exception):
    """A problem the user can fix; the message says what to do. Tracebacks are for bugs."""
