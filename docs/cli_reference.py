"""Write docs/cli.md, every command's arguments and options, from the command line itself.

    python docs/cli_reference.py > docs/cli.md

The page is generated, so it cannot drift from `--help`: a test regenerates it and compares.
"""

from __future__ import annotations

import inspect

import typer

from cntinit.cli import app

HEADER = """# Command-line reference

Every command's arguments and options, generated from the command line itself
(`python docs/cli_reference.py > docs/cli.md`; a test checks that this page matches).
[README](../README.md) is the guide; [capture.md](capture.md), [solve.md](solve.md),
[export.md](export.md) and [recipes.md](recipes.md) explain what the options do.
"""


def commands(group, prefix: str) -> list[tuple[str, object]]:
    """(full name, command) of every command under `group`, in the order --help lists them."""
    found = []
    context = type(group).context_class(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if hasattr(command, "list_commands"):
            found += commands(command, f"{prefix} {name}")
        else:
            found.append((f"{prefix} {name}", command))
    return found


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def default(param) -> str:
    if param.required:
        return "required"
    value = param.default
    if getattr(param, "is_flag", False):
        return "on" if value else "off"
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return ""
    return f"`{value}`"


def shown(argument) -> str:
    """MODEL, [CAPTURE_DIR], STORES..., as usage lines write them."""
    text = (argument.metavar or argument.name).upper() + ("..." if argument.nargs == -1 else "")
    return text if argument.required else f"[{text}]"


def is_argument(param) -> bool:
    return param.param_type_name == "argument"


def section(name: str, command) -> str:
    help_text = inspect.cleandoc(command.help or "")
    summary, _, rest = help_text.partition("\n\n")
    arguments = [p for p in command.params if is_argument(p)]
    usage = " ".join([name, "[OPTIONS]", *(shown(p) for p in arguments)])
    lines = [f"## {name}", "", cell(summary), "", f"`{usage}`", ""]
    if rest.strip():
        lines += ["```text", rest.strip(), "```", ""]
    lines += ["| argument or option | default | meaning |", "|---|---|---|"]
    for param in command.params:
        if is_argument(param):
            label = shown(param)
        else:
            label = ", ".join(param.opts + param.secondary_opts)
        lines.append(f"| `{label}` | {default(param)} | {cell(getattr(param, 'help', None) or '')} |")
    return "\n".join(lines) + "\n"


def page() -> str:
    root = typer.main.get_command(app)
    return "\n".join([HEADER, *(section(name, command) for name, command in commands(root, "cntinit"))])


if __name__ == "__main__":
    print(page(), end="")
