"""One exception type for problems the user can fix: the CLIs print it as one line and exit 2."""


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and what to do."""
