"""The one exception type that means "the user asked for something that cannot work"."""


class OpcdError(Exception):
    """Bad input: the CLI prints the message on one line and exits with code 2.

    Messages say what is wrong and what to do about it, in one sentence, without a traceback.
    """
