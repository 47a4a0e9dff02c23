"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HarnessError(Exception):
    """Bad input or an unmet precondition the user can fix; its message is the whole story."""
