"""The one exception type users see: a one-line message naming the problem and the fix."""


class CntinitError(Exception):
    """Bad input or state. The CLI prints `error: <message>` and exits with status 2."""
