"""A model's attachment points and their weights.

An attachment point is a linear map y = W x (+ b): `nn.Linear`, or transformers' GPT-2
`Conv1D`, which stores W transposed (in × out). Targets are picked by name.
"""

from __future__ import annotations

import functools
import re

import torch

try:  # the pattern parser of the standard library's re (Python 3.11's name, then 3.10's)
    from re import _constants, _parser
except ImportError:
    import sre_constants as _constants
    import sre_parse as _parser
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import CntinitError

ALL_LINEAR = "all-linear"


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attachment point by module path, in registration (≈ forward) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def select_targets(model: nn.Module, targets: str | list[str]) -> dict[str, nn.Module]:
    """Modules whose path ends with one of the comma-separated suffixes, or matches a `re:PATTERN`
    entry whole (to tell apart towers that share names, e.g. a VLM's language model and vision
    encoder), or `all-linear` (every linear layer but the output head, as PEFT does)."""
    linears = linear_modules(model)
    if _wanted(targets) == [ALL_LINEAR]:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = {n: m for n, m in linears.items() if m is not head}
    else:
        chosen = {n: linears[n] for n in select_names(list(linears), targets, "linear module")}
    if not chosen:
        raise CntinitError("this model has no linear modules to attach adapters to")
    return chosen


def select_names(names: list[str], targets: str | list[str], what: str) -> list[str]:
    """The `names` that `targets` picks (suffixes, `re:` patterns; `all-linear` picks them all),
    in their order; a target that picks none is an error listing what there is."""
    wanted = _wanted(targets)
    if wanted == [ALL_LINEAR]:
        return list(names)
    chosen = [n for n in names if any(_matches(n, t) for t in wanted)]
    missing = [t for t in wanted if not any(_matches(n, t) for n in chosen)]
    if missing:
        available = ", ".join(dict.fromkeys(module_kind(name) for name in names))
        raise CntinitError(f"--targets {','.join(missing)} matched no {what}; available: {available}")
    return chosen


def _wanted(targets: str | list[str]) -> list[str]:
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
    wanted = [t for t in wanted if t]
    if not wanted:
        raise CntinitError("--targets names no module: give module-name suffixes (q_proj,v_proj), re:PATTERN or all-linear")
    for target in wanted:
        if target.startswith("re:"):
            _pattern(target)
    return wanted


@functools.lru_cache(maxsize=64)  # matched against every module's name
def _pattern(target: str) -> re.Pattern:
    """The `re:` target's pattern, refused where it would not compile or could backtrack exponentially."""
    try:
        pattern = re.compile(target[3:])
    except re.error as exc:
        raise CntinitError(f"--targets {target} is not a regular expression ({exc}): fix it, e.g. re:.*language_model.*\\.q_proj") from None
    if _nested_repeat(_parser.parse(target[3:])):
        raise CntinitError(f"--targets {target} repeats a group that itself repeats or alternates, which can take exponential time to "
                           "match: write it without the nesting, e.g. re:.*\\.layers\\.(0|1)\\..*_proj")
    return pattern


def _nested_repeat(items, inside: bool = False) -> bool:
    """Whether a parsed pattern repeats (*, +, {m,n}) something that itself repeats or alternates."""
    for op, argument in items:
        if op in (_constants.MAX_REPEAT, _constants.MIN_REPEAT, getattr(_constants, "POSSESSIVE_REPEAT", None)):
            low, high, sub = argument
            repeats = high is _constants.MAXREPEAT or high > 1
            if (inside and repeats) or _nested_repeat(sub, inside or repeats):
                return True
        elif op is _constants.BRANCH:
            if inside or any(_nested_repeat(alternative, inside) for alternative in argument[1]):
                return True
        elif op is _constants.SUBPATTERN:
            if _nested_repeat(argument[-1], inside):
                return True
        elif op in (_constants.ASSERT, _constants.ASSERT_NOT):
            if _nested_repeat(argument[1], inside):
                return True
    return False


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return _pattern(target).fullmatch(name) is not None
    return name == target or name.endswith("." + target)


def module_kind(name: str) -> str:
    """A module path with everything up to the layer index stripped, e.g. `self_attn.q_proj`."""
    return re.sub(r"^.*\.\d+\.", "", name)


def parameter_aliases(net: nn.Module) -> dict[str, list[str]]:
    """Each parameter's name -> every name it goes by (a tied output layer's weight is the embeddings')."""
    shared: dict[int, list[str]] = {}
    for name, tensor in net.named_parameters(remove_duplicate=False):
        shared.setdefault(id(tensor), []).append(name)
    return {name: names for names in shared.values() for name in names}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W as out × in (Conv1D stores it transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def weight_values(module: nn.Module) -> torch.Tensor:
    """W (out × in) with its values: a module built without weights reads it from the checkpoint
    (`read_weight`, set by pretrained.Streamed); an offloaded module's weight (on the meta device
    between forwards) is read from CPU memory or disk, one module at a time."""
    reader = getattr(module, "read_weight", None)
    if reader is not None:
        return reader()
    if getattr(module, "_hf_hook", None) is None and module.weight.device.type != "meta":
        return weight_matrix(module).detach()
    from accelerate.utils import align_module_device

    with align_module_device(module, torch.device("cpu")):
        return weight_matrix(module).detach().clone()


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = weight_matrix(module).shape
    return in_features, out_features


def forward_root(model: nn.Module, target_names: list[str]) -> nn.Module:
    """The smallest module to run: the base model (skipping an LM or MLM head) when every
    target lies inside it."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and all(n.startswith(prefix + ".") for n in target_names):
        return base
    return model
