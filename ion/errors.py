"""The one exception type for errors a user can cause.

A ``UserError`` carries a message that names the file, the field and the fix.
The CLI prints it without a traceback and exits with status 2; everything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: config, data files, missing upstream outputs."""
