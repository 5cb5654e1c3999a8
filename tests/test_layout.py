"""The code's shape, checked: packages import only downward, no module imports another in a circle
or reaches for its private names, no function runs past 80 lines without saying why, and a mode or
a format is one registration that every stage then knows (docs/layout.md draws the map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from cntinit.export import formats
from cntinit.solve import modes
from cntinit.solve.linalg import split
from cntinit.solve.modes import registry

PACKAGE = Path(__file__).parent.parent / "cntinit"
LAYERS = [  # each part may import from itself and from the layers before it
    {"errors", "console", "finite"},
    {"distributed", "embedded", "registry", "hub"},
    {"storage"},
    {"models", "records"},  # side by side: the user's model, and their calibration records
    {"capture", "solve"},  # side by side: neither imports the other
    {"export"},
    {"plots", "recipe", "tables"},
    {"runner"},
    {"cli"},
    {"__main__", "__init__"},
]
LONG = 80  # lines of a function body (its docstring aside) past which a `# long:` comment must say why


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = file
    return found


def imports(name: str, file: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every cntinit import in `file`, anywhere in it."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "cntinit":
                found.append((target, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "cntinit"]
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (a name taken from a package that is one of its modules counts as that module)."""
    known = modules()
    edges = {}
    for name, file in known.items():
        edges[name] = set()
        for target, names, _ in imports(name, file):
            taken = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            edges[name] |= set(taken) if taken and len(taken) == len(names) else {target}
        edges[name].discard(name)
    return edges


def part(name: str) -> str:
    return name.split(".")[1] if "." in name else "__init__"


def layer(name: str) -> int:
    return next(i for i, parts in enumerate(LAYERS) if part(name) in parts)


def test_no_module_imports_another_in_a_circle():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for other in sorted(edges.get(node, ())):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [other])
            elif other in edges and other not in state:
                visit(other, path + [other])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" → ".join(cycle) for cycle in cycles]


def test_packages_import_only_downward():
    wrong = [f"{name} → {other}" for name, targets in graph().items() for other in targets
             if other != "cntinit" and part(other) != part(name) and layer(other) >= layer(name)]
    assert not wrong, wrong


def test_no_private_name_is_taken_from_another_module():
    taken = []
    for name, file in modules().items():
        for target, names, line in imports(name, file):
            taken += [f"{file.relative_to(PACKAGE)}:{line} takes {n} from {target}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(file.read_text())
        bound = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and (node.level or (node.module or "").startswith("cntinit")) for alias in node.names}
        taken += [f"{file.relative_to(PACKAGE)}:{node.lineno} reads {node.value.id}.{node.attr}" for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                  and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not taken, taken


def test_no_function_runs_long_without_a_reason():
    long = []
    for name, file in modules().items():
        lines = file.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body
            said = any("# long:" in lines[i] for i in range(node.lineno - 2, node.lineno))
            if body and node.end_lineno - body[0].lineno + 1 > LONG and not said:
                long.append(f"{file.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


def test_every_mode_and_format_is_registered_in_the_order_the_commands_list_them():
    assert list(modes.MODES) == ["cnt-x", "cnt-s", "cnt-sh", "lora", "pissa", "milora", "olora", "mica", "inilora", "inilora-alpha",
                                 "inilora-beta", "eva", "corda", "lora-ga", "lora-one", "loftq"]
    assert list(formats.FORMATS) == ["peft", "kohya", "diffusers"]
    for mode in modes.MODES.values():
        assert (mode.factor is None) != (mode.solve_all is None), mode.name  # one way to compute its factors
        assert mode.reads in (modes.WEIGHTS, modes.STATISTICS, modes.GRADIENTS) and mode.init in (modes.OFFSET, modes.RESIDUAL)
        assert not (mode.zero_update and mode.init == modes.RESIDUAL), mode.name


def _halves(batch, job):
    """A toy mode: B A = the rank-r split of W / 2, for the test below."""
    b, a, values = split(batch.weight / 2, job.rank, "svd", 0.5)
    return registry.Factors(b, a, values)


def test_a_mode_is_one_registration_that_solve_export_and_check_then_know(tiny, tmp_path, monkeypatch):
    """A mode registered from outside the package (its factor function and its Mode, nothing else) is
    resolved, solved, reported, exported and loaded back by PEFT like the built-in ones."""
    import transformers

    from cntinit.export import export, verify
    from cntinit.solve import Options, solve
    from cntinit.solve.solution import Solution

    monkeypatch.setitem(registry.MODES, "halves", registry.Mode("halves", reads=modes.WEIGHTS, init=modes.RESIDUAL, factor=_halves,
                                                                decompose="svd"))
    assert Options(mode="halves", rank=2).resolved().init == "residual"
    out = solve(None, tmp_path / "solve", mode="halves", rank=2, model=tiny["llama"], targets="q_proj")
    sol = Solution(out)
    assert sol.manifest["mode"] == "halves" and sol.manifest["init"] == "residual" and len(sol.report["modules"]) == 2
    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    for name, (b, a) in sol.factors().items():
        u, s, vh = torch.linalg.svd(net.get_submodule(name).weight.detach().double() / 2)
        torch.testing.assert_close((b @ a).double(), u[:, :2] * s[:2] @ vh[:2], rtol=1e-5, atol=1e-6)
    adapter = export(out, tmp_path / "adapter")
    assert verify(adapter, out) < 1e-4
    with pytest.raises(Exception, match="applies to --mode"):
        Options(mode="halves", niter=2).resolved()
