"""The one error type that means "the user's input is wrong".

The CLI turns a FitplanError into a one-line message and exit code 2, with no traceback.
Every message should name the problem and what is accepted.
"""


class FitplanError(ValueError):
    """Bad input: an unknown name, a malformed file, an impossible layout."""
