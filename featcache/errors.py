"""One exception type for problems the user can fix: the CLIs print it as one line and exit 2."""


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and what to do."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first line, for one-line errors (its type's name when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
