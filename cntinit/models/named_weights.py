"""Reading a safetensors checkpoint by the model's own names, as from_pretrained would fill them:
what lets solve, export and a layerwise capture take one weight (or one block) at a time
instead of loading the model, and fill a model built without weights part by part (`materialize`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import CntinitError
from . import linears, weight_files
from .placement import buffer_dtype

OWN_LOADING = "this checkpoint needs transformers' own loading; capture without --layerwise"  # the fix for a weight not read by name


class Weights:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read by the
    model's own names: transformers' renamings of checkpoint keys (legacy layouts, a base model
    prefix) applied as from_pretrained applies them, tied weights read from the one stored copy."""

    def __init__(self, directory: Path, net: nn.Module):
        self.directory = Path(directory)
        self.files = weight_files.safetensors_files(self.directory)
        if not self.files:
            raise CntinitError(f"{directory} has no safetensors weights (model.safetensors or its index): --layerwise reads "
                               "safetensors only; save the model with save_pretrained, or capture without --layerwise")
        sharded = not (self.directory / "model.safetensors").is_file()
        self.index = self.directory / "model.safetensors.index.json" if sharded else None  # the shards' index
        self.keys, self.converted = _model_keys(net, list(self.files))
        self.aliases = linears.parameter_aliases(net)  # tied weights (an output layer sharing the embeddings') are stored once

    def readable(self, name: str) -> bool:
        """Whether the model's tensor `name` is one tensor of the checkpoint (not converted from several)."""
        aliases = self.aliases.get(name, [name])
        return not any(alias in self.converted for alias in aliases) and any(alias in self.keys for alias in aliases)

    def key(self, name: str) -> str | None:
        """The checkpoint's key for the model's tensor `name` (or for a weight tied to it)."""
        for alias in self.aliases.get(name, [name]):
            if alias in self.converted:
                raise CntinitError(f"{self.directory}: the model's {alias} is made from several checkpoint tensors, which "
                                   "transformers converts on load: capture without --layerwise")
            if alias in self.keys:
                return self.keys[alias]
        return None

    def get(self, name: str) -> torch.Tensor | None:
        key = self.key(name)
        if key is None:
            return None
        with weight_files.opened(self.files[key]) as handle:
            return handle.get_tensor(key)

    def tensor(self, name: str, like: torch.Tensor, what: str, fix: str = OWN_LOADING) -> torch.Tensor:
        """The model's tensor `name` from the checkpoint, refused unless it fits `like` (the model's
        own, on the meta device): its shape, and 16- to 64-bit floats where `like` is floating point —
        int8 or float8 there are a quantized checkpoint's codes (its scales stored apart), not weights."""
        value = self.get(name)
        if value is None:
            raise CntinitError(f"{self.directory} has no weight for {name} ({what}): {fix}")
        if value.shape != like.shape:
            raise weight_files.misfit(self.directory, name, value.shape, like.shape)
        if like.is_floating_point() and value.dtype not in weight_files.STORED_FLOATS.values():
            raise weight_files.coded(self.directory, name, str(value.dtype).removeprefix("torch."))
        return value

    def matrix(self, name: str, module: nn.Module, loaded: torch.dtype) -> torch.Tensor:
        """W (out × in) of the linear module `name`, in the dtype from_pretrained would load it in."""
        weight = self.tensor(name + ".weight", module.weight, "a target's weight").to(loaded)
        return weight.T if isinstance(module, Conv1D) else weight

    def first_float_dtype(self) -> torch.dtype:
        for key in self.files:
            with weight_files.opened(self.files[key]) as handle:
                dtype = weight_files.STORED_FLOATS.get(handle.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32


def _model_keys(net: nn.Module, checkpoint_keys: list[str]) -> tuple[dict[str, str], set[str]]:
    """({model tensor name: checkpoint key}, model tensors that transformers builds from several keys):
    the names as they are where every checkpoint key is one of the model's, else through transformers'
    own key conversion (transformers 5) or, before it, the names with the base model prefix added or dropped."""
    state = net.state_dict()  # meta tensors: the names only
    if set(checkpoint_keys) <= state.keys():  # saved by this transformers' save_pretrained: every key is the model's own name
        return {key: key for key in checkpoint_keys}, set()  # (building the conversion mapping took 0.2 s of every solve and export)
    return _converted_keys(net, checkpoint_keys, state)


def _converted_keys(net: nn.Module, checkpoint_keys: list[str], state: dict) -> tuple[dict[str, str], set[str]]:
    """`_model_keys` through transformers' conversion of checkpoint keys, as from_pretrained converts them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        prefix = net.base_model_prefix + "." if net.base_model_prefix else ""
        keys = {}
        for key in checkpoint_keys:
            for name in (key, key.removeprefix(prefix), prefix + key):
                if name in state:
                    keys[name] = key
        return keys, set()
    transforms = get_model_conversion_mapping(net)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    keys, converted = {}, set()
    for key in checkpoint_keys:
        name, converter = rename_source_key(key, renamings, converters, net.base_model_prefix, state)
        if converter is None:
            keys[name] = key
        else:
            converted.add(name)
    return keys, converted


def load_dtype(net: nn.Module, weights: Weights) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` loads in: the config's, else the checkpoint's first float tensor's."""
    configured = getattr(net.config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    return configured if isinstance(configured, torch.dtype) else weights.first_float_dtype()


def materialize(root: nn.Module, names: list[str], prefix: str, weights: Weights, loaded: torch.dtype, device: torch.device,
                run_dtype: torch.dtype, what: str, fix: str = OWN_LOADING) -> None:
    """Put root's tensors `names` on `device` in `run_dtype`: meta ones read from the checkpoint (rounded
    through the dtype from_pretrained would load them in, as the normal capture's are), real ones
    (buffers computed at construction) as `placement.place` keeps them (RoPE's float32 frequencies stay)."""
    from accelerate.utils import set_module_tensor_to_device

    tensors = dict(root.named_parameters(remove_duplicate=False)) | dict(root.named_buffers(remove_duplicate=False))
    for name in names:
        tensor = tensors[name]
        if tensor.device.type == "meta":
            value = weights.tensor(prefix + name, tensor, what, fix)
        else:
            value = tensor
        if value.is_floating_point():
            value = value.to(loaded).to(run_dtype) if tensor.device.type == "meta" else value.to(buffer_dtype(value, run_dtype))
        set_module_tensor_to_device(root, name, device, value=value, dtype=value.dtype)
