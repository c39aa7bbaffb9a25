"""The one exception type the CLI turns into a one-line message and exit code 1."""


class KvcliError(Exception):
    """A failure the user can act on: bad input, unknown model, unusable cache file.

    The message is shown as-is on one line; it should say what was wrong and, where
    possible, what to do instead.
    """
