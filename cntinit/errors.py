"""The one exception type users see: a one-line message naming the problem and the fix."""

import difflib


class CntinitError(Exception):
    """Bad input or state. The CLI prints `<label>: <message>` and exits with `exit_code`."""

    label, exit_code = "error", 2


class Interrupted(CntinitError):
    """SIGINT/SIGTERM during a checkpointed capture (or a recipe's run): what finished is kept; exit 130."""

    label, exit_code = "interrupted", 130


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): enough for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def not_one_of(option: str, value, allowed) -> CntinitError:
    """`--mode cnt_s is not one of …: did you mean cnt-s?` — the nearest allowed value, when one is near."""
    allowed = [str(a) for a in allowed]
    folded = {a.lower(): a for a in allowed}
    near = difflib.get_close_matches(str(value).lower(), list(folded), n=1, cutoff=0.6)
    hint = f": did you mean {folded[near[0]]}?" if near else ""
    return CntinitError(f"{option} {value} is not one of {', '.join(allowed)}{hint}")
