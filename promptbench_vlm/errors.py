"""Errors that the CLI turns into one clear line and exit code 2 (never a traceback), and the
warnings it shows as one ``warning:`` line."""


class UserError(Exception):
    """A problem with what the user asked for: a bad name, a missing file, bad data."""


class InputWarning(UserWarning):
    """Input that was used, but not as given (a text file read as Latin-1, a cache entry
    rebuilt, a dataset that trains and scores on the same images): the user should know."""
