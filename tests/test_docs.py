"""The documentation cannot drift from the command line: the reference page is the generated one,
each stage's page names every option of its command, and every relative link leads somewhere."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import typer

from cntinit.cli import app

ROOT = Path(__file__).parent.parent
PAGES = {"capture": "capture.md", "merge": "capture.md", "solve": "solve.md", "export": "export.md", "run": "recipes.md"}


def commands() -> dict:
    root = typer.main.get_command(app)
    context = type(root).context_class(root)
    return {name: root.get_command(context, name) for name in root.list_commands(context)}


def test_the_cli_reference_is_the_generated_one():
    generated = runpy.run_path(str(ROOT / "docs" / "cli_reference.py"))["page"]()
    assert (ROOT / "docs" / "cli.md").read_text() == generated, "run: python docs/cli_reference.py > docs/cli.md"
    for name, command in commands().items():
        assert f"## cntinit {name}" in generated
        for param in getattr(command, "params", []):
            if param.param_type_name == "option":  # arguments appear by their metavar
                assert all(re.search(rf"[`, ]{re.escape(option)}[`,]", generated) for option in param.opts), (name, param.opts)


@pytest.mark.parametrize("command", sorted(PAGES))
def test_each_stage_page_explains_every_option(command):
    text = (ROOT / "docs" / PAGES[command]).read_text()
    options = [o for p in commands()[command].params for o in p.opts if o.startswith("--")]
    missing = [o for o in options if f"`{o}" not in text]
    assert options and not missing, f"docs/{PAGES[command]} does not explain {missing}"


def test_every_relative_link_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, broken


def test_readme_opens_with_the_two_commands_and_reads_as_a_guide():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert blocks[0].strip().endswith("cntinit demo") and blocks[1].strip().endswith("python -m pytest -q")
    assert all(b.count("\n") == 1 for b in blocks[:2])  # one command each
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:3] == ["What it does", "A first real run", "Choosing a mode"] and "Reference" in headings
    assert len(text) < 20_000  # the exhaustive material lives in docs/
