"""The exception types for what a user can cause (bad flags, missing data, bad checkpoints, Ctrl-C).

Command-line entry points catch them and print one line instead of a traceback: a UserError exits
with status 2, an Interrupted (Ctrl-C, with what was kept and how to go on) with 130.
"""


class UserError(Exception):
    """A problem with the user's input (data, flags, files), reported as one line, exit code 2."""

    exit_code = 2
    label = "error"


class Interrupted(UserError):
    """Ctrl-C, reported as one line saying what was kept and how to continue; exit code 130."""

    exit_code = 130
    label = "interrupted"
