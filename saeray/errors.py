"""The two kinds of failure the CLI distinguishes (exit code 2 vs 1).

Raise these with a message that names the field or file and says what to do; the CLI prints the
message without a traceback.
"""


class SaerayError(Exception):
    """Runtime failure (exit code 1): the input was fine, something went wrong while running."""

    exit_code = 1


class InputError(SaerayError):
    """Bad usage, invalid spec or invalid input (exit code 2)."""

    exit_code = 2
