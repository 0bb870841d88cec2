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


class DiskFull(OpcdError):
    """A write that failed for want of space; ``then`` says how to go on."""

    def __init__(self, what: str, detail: str, then: str = "free some space and run again"):
        super().__init__(f"the disk is full: {what} could not be written ({detail}); nothing half-written was kept: "
                         f"{then}")
        self.what, self.detail = what, detail


def write_failure(error: BaseException, what: str) -> DiskFull | None:
    """A write that failed for want of disk space (``ENOSPC``, a quota, or the messages torch and safetensors give
    for it) as a one-line error saying so, or None for any other failure."""
    import errno

    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        sign in text for sign in ("No space left on device", "Disk quota exceeded", "file write failed"))
    return DiskFull(what, first_line(error)) if full else None
