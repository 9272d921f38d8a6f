"""Errors a user can fix.

Anything raised as :class:`UserError` is printed by the CLI as one line and exits with code 2;
every other exception is a bug in privlora and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what was wrong and how to fix it."""

    exit_code = 2
