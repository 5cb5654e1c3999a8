"""The one exception type users see: a one-line message naming the problem and the fix."""


class CntinitError(Exception):
    """Bad input or state. The CLI prints `<label>: <message>` and exits with `exit_code`."""

    label, exit_code = "error", 2


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
