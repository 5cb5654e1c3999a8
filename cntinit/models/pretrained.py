"""The pretrained weights solve and export read — each target's W and bias — and the residual
base export writes from them.

A transformers model stored in safetensors is never loaded whole: it is built without weights,
each target's W is read when it is needed, by the model's own names (as a layerwise capture
reads them), and the residual base is written file by file — each of the checkpoint's files
copied with W − BA in place of every adapted W — so a 70B model takes the memory of a batch of
weights in solve, of one weight in export and of a chunk of modules in `export --check` (which
reads the written base the same way), not of the model. Diffusers pipelines, checkpoints
whose tensors transformers converts on load, classes that keep modules in float32, and `--offload`
placements load the model.
"""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .. import console, hub
from ..console import warn
from ..errors import CntinitError
from ..storage.manifests import scheme_of
from . import fingerprints, linears, loading, named_weights, pipelines
from .placement import Placement
from .rewrite import rewrite
from .source import locate

ROW_BYTES = 1 << 20  # float64 rows of W − BA computed (and written) at a time
NORM_SLACK = 1.1  # the warning's bound takes the norms as up to 10% off: summed block by block in float64, they are within 1e-4
RESIDUAL_PRECISION = 1e-2  # warn when rounding W − BA moves base + BA this much further (relative) from W than rounding W does
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")


class Precision:
    """How far rounding W − BA to the dtype training runs in moves base + BA off W, beyond what
    rounding W itself costs: the worst module, warned about once."""

    def __init__(self, trained_in: torch.dtype):
        self.trained_in, self.worst, self.where = trained_in, 0.0, ""

    def residual(self, name: str, rows, b: torch.Tensor, a: torch.Tensor, transposed: bool, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """W − B@A computed in float64 and rounded once to `dtype`, in W's layout (`transposed`: W is
        stored in × out, as Conv1D stores it), in blocks of rows: `rows[start:end]` gives those rows of
        W as stored (taken to `dtype` first, as the model holds them). Each block is a view of buffers
        the next one reuses — write or copy it before asking for the next. ROW_BYTES of float64 at a
        time: the whole-weight arrays this took before (W, its float64 copy, the result) page-faulted
        into every export process (SmolLM2-135M's base: 0.8–1.1 s to write, 0.7 s in blocks)."""
        b, a = (a.double().T, b.double().T) if transposed else (b.double(), a.double())
        height, width = b.shape[0], a.shape[1]
        step = max(1, min(height, ROW_BYTES // (8 * width)))
        work, out = torch.empty(step, width, dtype=torch.float64), torch.empty(step, width, dtype=dtype)
        base_sq = weight_sq = 0.0
        for start in range(0, height, step):
            end = min(height, start + step)
            stored = rows[start:end].to(dtype)
            block, rounded = work[: end - start], out[: end - start]
            block.copy_(stored).addmm_(b[start:end], a, alpha=-1)
            rounded.copy_(block)
            base_sq += float(torch.linalg.vector_norm(rounded, dtype=torch.float32)) ** 2
            weight_sq += float(torch.linalg.vector_norm(stored, dtype=torch.float32)) ** 2
            yield rounded
        if self._may_warn(math.sqrt(base_sq), math.sqrt(weight_sq), height * width):
            self._measure(name, rows[0:height].to(dtype).double(), b, a)

    def _measure(self, name: str, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
        """How far base + BA moves off W when the base is rounded to the training dtype, beyond rounding W itself."""
        size = w.norm().clamp(min=1e-30)
        lost = float((w.addmm(b, a, alpha=-1).to(self.trained_in).double() + b @ a - w).norm() / size)
        own = float((w.to(self.trained_in).double() - w).norm() / size)
        if lost - own > self.worst:
            self.worst, self.where = lost - own, name

    def _may_warn(self, base_norm: float, size: float, numel: int) -> bool:
        """Whether rounding W − BA (of norm `base_norm`, already rounded once to W's dtype) to the training
        dtype could move base + BA off W (of norm `size`) by RESIDUAL_PRECISION: rounding moves each entry
        by at most u·|x| (u the unit roundoff) plus half the spacing of subnormals, so ‖error‖ ≤ u‖W − BA‖ +
        ½·spacing·√n — bounded here with NORM_SLACK for the norms (a float32 norm of a whole 10⁸-value
        weight was 1% off; each block's is within 1e-5, and the blocks are summed in float64) — and
        nothing past the dtype's range overflows. (A 4× slack failed every bfloat16 base, whose u is 2⁻⁸:
        each adapted weight was read again and measured whole in float64, 1 s a 4096 × 11008 weight.)"""
        info = torch.finfo(self.trained_in)
        bound = info.eps / 2 * base_norm + info.smallest_normal * info.eps / 2 * numel ** 0.5
        return not (math.isfinite(base_norm) and base_norm < info.max / 4 and bound * NORM_SLACK <= RESIDUAL_PRECISION * size)

    def report(self) -> None:
        if self.worst > RESIDUAL_PRECISION:
            warn(f"W − B@A in {str(self.trained_in).removeprefix('torch.')} moves the initial model off the pretrained one by up to "
                 f"{self.worst:.2g} (relative, {self.where}) beyond rounding W itself: B@A is large next to W; use --init offset for "
                 "this solve, or train in a wider dtype (--train-dtype says which one training uses)")


def _base_blocks(name: str, rows, factors: dict, fan_in_fan_out: dict[str, bool], bases: dict[str, torch.Tensor],
                 precision: Precision, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """What the base stores for the adapted weight `name` (`rows[start:end]`: W's rows as the module
    stores it), in blocks of rows in W's layout and `dtype`: the NF4 base the solve fitted to
    (`bases`, out × in) whole, else W − B@A computed in float64 (Precision.residual)."""
    transposed = fan_in_fan_out[name]  # Conv1D stores W transposed
    if name in bases:
        yield (bases[name].T if transposed else bases[name]).to(dtype)
        return
    b, a = factors[name]
    yield from precision.residual(name, rows, b, a, transposed, dtype)


def refuse_tied(names: list[str], source: "Streamed | Loaded") -> None:
    """A residual base of a weight another module shares (an output layer tied to the embeddings)
    would change that module too: the initial model would not be the pretrained one."""
    aliases = linears.parameter_aliases(source.net)
    for name in names:
        shared = [other for other in aliases.get(name + ".weight", []) if other != name + ".weight"]
        if shared:
            raise CntinitError(f"{name} shares its weight with {shared[0].removesuffix('.weight')}, so W − BA in the residual base would "
                               f"change that module too: leave {name} out of --targets, or solve with --init offset")


class Streamed:
    """A transformers model in safetensors, built without weights: each target module (on the meta
    device, in the dtype from_pretrained would give it) reads its W from the checkpoint when
    `linears.weight_values` asks for it."""

    def __init__(self, path: Path, net: nn.Module, modules: dict[str, nn.Module], weights: named_weights.Weights):
        self.path, self.net, self.modules, self.weights = path, net, modules, weights
        self.dtype = named_weights.load_dtype(net, weights)
        for name, module in modules.items():
            module.to(self.dtype)
            module.read_weight = functools.partial(weights.matrix, name, module, self.dtype)

    def layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pretrained W (out × in) and bias of the target `name`, read from the checkpoint."""
        module = self.modules[name]
        bias = None if module.bias is None else \
            self.weights.tensor(name + ".bias", module.bias, "a target's bias", "save the model again with save_pretrained").to(self.dtype)
        return linears.weight_values(module), bias

    @classmethod
    def open(cls, path: Path, trust_remote_code: bool, pick) -> "Streamed | None":
        """The model at `path` with the targets `pick(net)` chooses, or None where they cannot be
        read by name as from_pretrained gives them (no safetensors files, a weight transformers
        builds from several tensors, a class that keeps some modules in float32, as T5 its `wo`)."""
        if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            return None
        net, _ = loading.load(path, trust_remote_code, skeleton=True)
        if getattr(net, "_keep_in_fp32_modules", None) or getattr(net, "_keep_in_fp32_modules_strict", None):
            return None
        modules = pick(net)
        weights = named_weights.Weights(path, net)  # a malformed shard index is refused, not loaded another way
        if not all(weights.readable(name + ".weight") for name in modules):
            return None
        return cls(path, net, modules, weights)

    def write_base(self, directory: Path, factors: dict, fan_in_fan_out: dict[str, bool], bases: dict[str, torch.Tensor],
                   precision: Precision) -> None:
        """The checkpoint's files with W − BA (or the NF4 base in `bases`) for each adapted weight,
        one weight in memory at a time; its other files (config, tokenizer, index) copied as they are."""
        refuse_tied(list(factors), self)
        adapted = {self.weights.key(name + ".weight"): name for name in factors}
        files = sorted(set(self.weights.files.values()))
        directory.mkdir(parents=True)
        with console.progress() as bar:
            task = bar.add_task(f"residual base, {len(files)} file{'s' if len(files) > 1 else ''}", total=len(files))
            for file in files:
                replaced = {key: self.dtype for key in adapted if self.weights.files[key] == file}
                rewrite(file, directory / file.name, replaced, lambda key, rows: _base_blocks(
                    adapted[key], rows, factors, fan_in_fan_out, bases, precision, self.dtype))
                bar.advance(task)
        written = {file.name for file in files}
        for item in self.path.iterdir():  # config, tokenizer, the shards' index; no other weights, nor another index
            if item.is_file() and item.name not in written and (item == self.weights.index or not item.name.endswith(WEIGHT_FILES)):
                shutil.copy2(item, directory / item.name)


class Loaded:
    """The model loaded (diffusers pipelines; checkpoints transformers converts on load; an
    `--offload` placement, which keeps it within its memory limits)."""

    def __init__(self, path: Path, trust_remote_code: bool, pick, placement: Placement | None = None):
        self.path = path
        self.net, self.tokenizer = loading.load(path, trust_remote_code, placement)
        self.modules = pick(self.net)
        self.dtype = self.net.dtype

    def layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pretrained W (out × in) and bias of the target `name`."""
        module = self.modules[name]
        return linears.weight_values(module), None if module.bias is None else module.bias.detach()

    def write_base(self, directory: Path, factors: dict, fan_in_fan_out: dict[str, bool], bases: dict[str, torch.Tensor],
                   precision: Precision) -> None:
        """The loaded model with W − BA (or the NF4 base in `bases`) in every adapted module, saved."""
        refuse_tied(list(factors), self)
        with torch.no_grad():
            for name in factors:
                weight = self.modules[name].weight
                base, start = torch.empty_like(weight), 0
                for block in _base_blocks(name, weight, factors, fan_in_fan_out, bases, precision, weight.dtype):
                    base[start : start + block.shape[0]] = block  # whole before W changes: the warning may read it
                    start += block.shape[0]
                weight.copy_(base)
        if isinstance(self.net, pipelines.DiffusionParts):
            self.net.save_pretrained(directory, self.path)
            return
        self.net.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def open_model(path: str | Path, trust_remote_code: bool, pick, placement: Placement | None = None) -> Streamed | Loaded:
    """The model at `path` with the target modules `pick(net)` returns: read by name where it can
    be, else loaded (always with a `placement`)."""
    path = locate(path, trust_remote_code=trust_remote_code)
    streamed = None if placement is not None or pipelines.is_pipeline(path) else Streamed.open(path, trust_remote_code, pick)
    return streamed or Loaded(path, trust_remote_code, pick, placement)


def recorded_path(record: dict) -> Path:
    """Where a manifest's model is: its recorded path, or — moved to another machine — the same Hub
    snapshot in this machine's Hugging Face cache."""
    path = Path(record["path"])
    return hub.resolve(record["repo"], record["revision"]) if not path.exists() and "repo" in record else path


def open_recorded(manifest: dict, model: str | Path | None, trust_remote_code: bool,
                  placement: Placement | None = None) -> Streamed | Loaded:
    """The model a capture or solve `manifest` records (or `model`, the same weights elsewhere),
    with its modules, refusing weights other than the ones it recorded."""
    path = Path(model) if model is not None else recorded_path(manifest["model"])
    names = list(manifest["modules"])

    def recorded(net: nn.Module) -> dict[str, nn.Module]:
        named = dict(net.named_modules())
        missing = [name for name in names if name not in named]
        if missing:
            raise CntinitError(f"{path} has no module {missing[0]} that the capture recorded: pass --model with the captured model")
        return {name: named[name] for name in names}

    source = open_model(path, trust_remote_code, recorded, placement)
    expected = manifest["model"]["fingerprint"]
    if fingerprints.fingerprint(source.modules, scheme=scheme_of(expected), model_dir=source.path) != expected:
        raise CntinitError(f"the weights at {path} differ from the ones captured (fingerprint mismatch): "
                           "capture again with these weights, or pass --model with the captured ones")
    return source
