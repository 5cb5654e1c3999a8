"""Recipes: one YAML file naming a model, its calibration data, the capture, the solves and the
exports — checked whole, before anything runs.

The keys each section accepts are the parameters of the Python API (`capture`, `SolveOptions`,
`export`), read from their signatures, so a recipe can say whatever a command line can and
a misspelled key is an error that names it. Files are read with `yaml.safe_load`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import records
from .errors import CntinitError
from .models.source import locate

EMBEDDED = "embedded"  # `model: embedded`, `data: embedded`: the model and verses that ship with the install
TOP = {"name": str, "model": str, "revision": str, "targets": str | list[str], "out": str, "device": str, "plot": bool,
       "capture": dict, "solves": list, "exports": list}
NOT_IN_CAPTURE = {"model", "revision", "out", "targets", "device", "overwrite", "trust_remote_code"}  # set at the top or on the command line
# lora_lr only turns the printed learning-rate advice into rates: a recipe's exports are compared by their options
NOT_IN_EXPORT = {"solve_dir", "out", "model", "revision", "overwrite", "trust_remote_code", "check", "lora_lr"}
SYSTEM_DIRECTORIES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/opt", "/proc", "/run", "/sbin", "/srv", "/sys", "/usr", "/var")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # solve and export names become directory names under `out`


def _schema(function, leave_out: set[str]) -> dict[str, object]:
    hints = typing.get_type_hints(function)
    return {name: hints[name] for name in inspect.signature(function).parameters if name not in leave_out}


@functools.cache
def schemas() -> dict[str, dict[str, object]]:
    """The keys of the capture, each solve and each export: the parameters of `capture`, `Options` and
    `export`, imported here rather than with this module, so that a recipe's missing model or data is
    refused before the stages (torch) load."""
    from .capture import capture
    from .export import export
    from .solve import Options
    return {"capture": _schema(capture, NOT_IN_CAPTURE),
            "solves": {"name": str, "targets": str | list[str]} | {f.name: typing.get_type_hints(Options)[f.name]
                                                                    for f in dataclasses.fields(Options)},
            "exports": {"name": str, "check": bool} | _schema(export, NOT_IN_EXPORT)}


@dataclass
class Recipe:
    name: str
    model: str
    out: Path
    revision: str | None = None  # of a Hub id `model`
    targets: str | list[str] = "all-linear"
    device: str = "auto"
    plot: bool = True
    capture: dict | None = None
    solves: list[dict] = field(default_factory=list)
    exports: list[dict] = field(default_factory=list)


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`capture.max_samples=64`, `solves.0.rank=16`) and check a recipe."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CntinitError(f"cannot read the recipe {path} ({exc.strerror or exc}): check the path") from None
    except UnicodeDecodeError as exc:
        raise CntinitError(f"the recipe {path} is not UTF-8 (byte {exc.start}): save it as UTF-8") from None
    except RecursionError:
        raise CntinitError(f"the recipe {path} nests too deeply to be a recipe: a recipe is a few levels of keys and lists") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise CntinitError(f"{path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict):
        raise CntinitError(f"{path} must be a YAML mapping of keys (model, capture, solves, exports), not {type(raw).__name__}")
    for override in overrides:
        _override(raw, override)
    _refuse_missing(raw)
    return check(raw, default_name=path.stem)


def _refuse_missing(raw: dict) -> None:
    """A model or calibration data that is not there (a path, a Hub id not in the cache), refused before
    the stages load; the keys' other checks follow in `check`."""
    model, capture = raw.get("model"), raw.get("capture")
    data = capture.get("data") if isinstance(capture, dict) else None
    revision = raw.get("revision") if isinstance(raw.get("revision"), str) else None
    if isinstance(model, str) and model != EMBEDDED:
        located("model", lambda: locate(model, revision))
    if isinstance(data, str) and data not in (EMBEDDED, "-"):
        located("capture.data", lambda: records.locate(data))


def located(key: str, find):
    """`find()` — a recipe's model or data found — or its error, said as the recipe key that names it."""
    try:
        return find()
    except CntinitError as exc:
        raise CntinitError(f"recipe key {key}: {exc} (override: {key}=PATH)") from None


def check(raw: dict, default_name: str = "recipe") -> Recipe:
    """A Recipe from a parsed mapping, or a CntinitError naming the first bad key."""
    values = _section(raw, TOP, "")
    for required in ("model", "solves"):
        if required not in values:
            raise CntinitError(f"recipe key {required} is missing: a recipe names a model and at least one solve")
    capture = _section(values["capture"], schemas()["capture"], "capture.") if "capture" in values else None
    if capture is not None and "data" not in capture:
        raise CntinitError("recipe key capture.data is missing: name the calibration data (a file, a folder, or embedded)")
    if capture is not None and str(capture["data"]) == "-":
        raise CntinitError("recipe key capture.data: a recipe cannot read stdin (the cache keys on the data's contents); name a file or folder")
    solves = [_section(entry, schemas()["solves"], f"solves.{i}.") for i, entry in enumerate(_list(values["solves"], "solves"))]
    if not solves:
        raise CntinitError("recipe key solves is empty: give at least one solve (e.g. - {mode: cnt-s, rank: 16})")
    exports = [_section(entry, schemas()["exports"], f"exports.{i}.") for i, entry in enumerate(_list(values.get("exports", []), "exports"))]
    for i, solve in enumerate(solves):
        if "mode" not in solve:
            raise CntinitError(f"recipe key solves.{i}.mode is missing: cnt-x, cnt-s, cnt-sh, eva, corda, lora, pissa, ...")
        solve.setdefault("name", _solve_name(solve))
    for entry in exports:
        entry.setdefault("name", entry.get("format", "peft"))
    for group, entries in (("solves", solves), ("exports", exports)):
        seen = set()
        for i, entry in enumerate(entries):
            if not NAME.match(entry["name"]):
                raise CntinitError(f"recipe key {group}.{i}.name {entry['name']!r} must be a plain name (letters, digits, . _ -): it becomes a directory under out")
            if entry["name"] in seen:
                raise CntinitError(f"recipe key {group}.{i}.name: two {group} are named {entry['name']}; give one another name")
            seen.add(entry["name"])
    name = values.get("name", default_name)
    if not NAME.match(name):
        raise CntinitError(f"recipe key name {name!r} must be a plain name (letters, digits, . _ -)")
    out = Path(values.get("out", Path("cntinit-out") / name)).expanduser()
    place = out.resolve()
    home = Path.home().resolve()
    if place == Path(place.anchor) or home.is_relative_to(place) or str(place) in SYSTEM_DIRECTORIES:
        raise CntinitError(f"recipe key out: {out} would put the recipe's solves and exports straight into {place}: "
                           "name a directory of their own, e.g. cntinit-out/NAME")
    return Recipe(name=name, model=values["model"], out=out, revision=values.get("revision"),
                  targets=values.get("targets", "all-linear"), device=values.get("device", "auto"), plot=values.get("plot", True),
                  capture=capture, solves=solves, exports=exports)


def _solve_name(solve: dict) -> str:
    """cnt-x-r16, cnt-x-r16-vas: readable and unique for the usual recipes."""
    from .solve import Options
    return f"{solve['mode']}-r{solve.get('rank', Options.rank)}" + ("-vas" if solve.get("vas") else "")


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise CntinitError(f"recipe key {where} must be a list (- mode: cnt-s ...), got {_describe(value)}")
    return value


def _section(raw, schema: dict, prefix: str) -> dict:
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise CntinitError(f"recipe key {where} must be a mapping of keys, got {_describe(raw)}")
    checked = {}
    for name, value in raw.items():
        if name not in schema:
            known = ", ".join(sorted(schema))
            near = difflib.get_close_matches(str(name), list(schema), n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise CntinitError(f"recipe key {prefix}{name} is not known{hint}; {where} takes: {known}")
        checked[name] = _conform(value, schema[name], f"{prefix}{name}")
    return checked


def _conform(value, hint, where: str):
    """`value` as type `hint` (int → float where a number is wanted, a list for a tuple), or an error naming `where`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _conform(value, option, where)
            except CntinitError:
                continue
        raise CntinitError(f"recipe key {where} must be {' or '.join(_noun(h) for h in typing.get_args(hint))}, got {_describe(value)}")
    if origin in (list, tuple):
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise CntinitError(f"recipe key {where} must be {_noun(hint)}, got {_describe(value)}")
        items = [_conform(v, item, f"{where}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    ok = {type(None): value is None, bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          Path: isinstance(value, str), dict: isinstance(value, dict), list: isinstance(value, list)}[hint]
    if not ok:
        raise CntinitError(f"recipe key {where} must be {_noun(hint)}, got {_describe(value)}")
    return float(value) if hint is float else value


def _noun(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return f"a list of {_noun(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_noun(h) for h in typing.get_args(hint))
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path", dict: "a mapping", list: "a list"}[hint]


def _describe(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _override(raw: dict, text: str) -> None:
    """Apply one `dotted.key=value` (value read as YAML: 16, true, [a, b], text) to the parsed recipe."""
    dotted, sep, value = text.partition("=")
    if not sep or not dotted:
        raise CntinitError(f"override {text!r} must be key=value, e.g. capture.max_samples=64 or solves.0.rank=16")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except (yaml.YAMLError, RecursionError):
        parsed = value
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CntinitError(f"override {dotted}: {'.'.join(parts[:depth]) or 'the list'} has {len(node)} entries; {part} is not one of 0..{len(node) - 1}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise CntinitError(f"override {dotted}: {where} is a {type(node).__name__}, it has no keys")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise CntinitError(f"override {dotted}: the list has {len(node)} entries; {last} is not one of 0..{len(node) - 1}")
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        raise CntinitError(f"override {dotted}: {'.'.join(parts[:-1])} is a {type(node).__name__}, it has no keys")
