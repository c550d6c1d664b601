"""The one exception type the CLI turns into a one-line message."""


class GarageError(Exception):
    """A problem the user can act on: the message names it and the fix."""
