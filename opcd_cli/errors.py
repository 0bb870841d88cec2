"""The one exception type that means "the user asked for something that cannot work"."""


class OpcdError(Exception):
    """Bad input: the CLI prints the message on one line and exits with code 2.

    Messages say what is wrong and what to do about it, in one sentence, without a traceback.
    """


class Interrupted(OpcdError):
    """Ctrl-C or a stop signal: the CLI prints the message on one line and exits with code 130 (SIGINT) or 143
    (SIGTERM)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
