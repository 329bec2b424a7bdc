"""The one exception type for errors a user can cause.

A ``UserError`` carries a message that names the file, the field and the fix.
The CLI prints it without a traceback and exits with status 2; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: config, data files, missing upstream outputs."""


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGINT, SIGTERM) and stopped at a safe point.

    A KeyboardInterrupt, so everything that cleans up after Ctrl-C cleans up
    after it too; `signum` is the signal that asked, when known (the CLI exits
    128 + signum).
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum
