"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do.

    The CLI prints it as one line and exits with code 2, without a traceback.
    """
