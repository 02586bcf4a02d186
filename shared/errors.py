"""The one exception type for mistakes a user can make (bad flags, missing data, bad checkpoints).

Command-line entry points catch it, print its message on one line and exit with status 2, so a
user sees what to fix instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input (data, flags, files), reported as one line, exit code 2."""
