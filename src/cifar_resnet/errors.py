"""The one exception type for mistakes a user can fix (bad data, config or files)."""


class UserError(Exception):
    """A problem with the user's input; its message names the problem and the fix."""
