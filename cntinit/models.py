"""Loading a transformers model from a local path and finding its attachment points.

An attachment point is a linear map y = W x (+ b): `nn.Linear`, or transformers' GPT-2
`Conv1D`, which stores W transposed (in × out).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import pipelines, weight_files
from .errors import CntinitError, first_line, not_one_of

ALL_LINEAR = "all-linear"

# bitsandbytes' CPU backend warns at import, through transformers, that an optional kernels package is missing
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


TASK_TYPES = {  # the model class's ending -> PEFT's task type, which picks the PeftModel subclass a trainer gets
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",  # GPT-2's GPT2LMHeadModel
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
}


def task_type(class_name: str) -> str | None:
    """PEFT's task type for a model class, by its name's ending; None when the name does not say."""
    return next((task for ending, task in TASK_TYPES.items() if class_name.endswith(ending)), None)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model predicts the next token (what a gradient capture's loss needs)."""
    return task_type(type(model).__name__) == "CAUSAL_LM"


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # what `org/name` on the Hugging Face Hub looks like


def must_exist(path: str | Path) -> Path:
    """`path`, or the error every stage gives for a model that is not there."""
    path = Path(path)
    if not path.exists() and HUB_ID.match(str(path)):
        raise CntinitError(f"model path {path} does not exist; it looks like a Hugging Face Hub id, but the Hub is never contacted: "
                           f"download it first (`huggingface-cli download {path} --local-dir {path.name}`) and give that local directory")
    if not path.exists():
        raise CntinitError(f"model path {path} does not exist: give a local model directory (the Hub is not used)")
    return path


def load(path: str | Path, trust_remote_code: bool = False, placement: "Placement | None" = None, empty: bool = False):
    """(model, tokenizer or None) from a local directory, in the checkpoint's own dtype, eval mode.

    The class is the one config.json names (so module paths match what trainers load),
    falling back to AutoModel. A diffusers pipeline directory loads as `pipelines.DiffusionParts`.
    A model without tokenizer files (a vision encoder) gets None. With a `placement`, accelerate
    spreads the weights over the device, then CPU memory, then disk, within its limits. `empty`
    builds the model without reading its weights: parameters on the meta device, buffers real
    (a layerwise capture reads the weights itself, block by block).
    """
    path = must_exist(path)
    if pipelines.is_pipeline(path):
        if placement is not None:
            raise CntinitError(f"--offload places transformers models; {path} is a diffusers pipeline: leave out --offload")
        for part in (*pipelines.COMPONENTS, "vae"):
            if (path / part).is_dir():
                weight_files.refuse_pickles(path / part)
        return pipelines.load(path)
    if not (path / "config.json").is_file():
        raise CntinitError(f"{path} is not a transformers model directory (no config.json): give the folder save_pretrained wrote")
    weight_files.refuse_pickles(path)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        weight_files.refuse_quantized(path, config)
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        model_class = model_class or transformers.AutoModel
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = (transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code) if model_class is transformers.AutoModel
                         else model_class._from_config(config))
            model.tie_weights()  # as from_pretrained does: a tied output layer shares the embeddings' parameter
        else:
            spread = placement.arguments() if placement is not None else {}
            model, loading = model_class.from_pretrained(path, dtype=spread.pop("dtype", "auto"), trust_remote_code=trust_remote_code,
                                                         output_loading_info=True, ignore_mismatched_sizes=True, **spread)
            weight_files.refuse_incomplete(path, loading["missing_keys"], loading["mismatched_keys"])
            weight_files.refuse_codes(path, model)
    except CntinitError:
        raise
    except Exception as exc:
        if placement is not None and "_no_split_modules" in str(exc):
            raise CntinitError(f"{path}: this architecture does not say how to split it across devices, so --offload "
                               "cannot place it: run without --offload") from None
        raise CntinitError(f"could not load the model at {path}: {first_line(exc)} — give a complete save_pretrained directory "
                           "of an architecture this transformers knows (custom code needs --trust-remote-code)") from None
    model.eval().requires_grad_(False)
    return model, _tokenizer(path, trust_remote_code)


def _tokenizer(path: Path, trust_remote_code: bool):
    """The model's tokenizer, or None where its directory has no tokenizer files (a vision encoder)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CntinitError(f"could not load the tokenizer at {path}: {first_line(exc)} — its tokenizer files are damaged or of "
                           "another version: put the model's own tokenizer files (save_pretrained's) beside its weights") from None


def record(net: nn.Module, path: str | Path, fingerprint: str) -> dict:
    """The model as the manifests record it; a pipeline with two text encoders has the SDXL layout,
    which export's kohya names follow."""
    entry = {"path": str(Path(path).absolute()), "class": type(net).__name__, "fingerprint": fingerprint, "kind": modality(net)}
    if isinstance(net, pipelines.DiffusionParts) and net.text_encoder_2 is not None:
        entry["layout"] = pipelines.SDXL
    return entry


def modality(model: nn.Module) -> str:
    """What the model reads: "diffusion" (a pipeline), "vision" (pixel_values) or "text"."""
    if isinstance(model, pipelines.DiffusionParts):
        return "diffusion"
    return "vision" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"


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
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    return [t for t in wanted if t]


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.fullmatch(target[3:], name) is not None
        except re.error as exc:
            raise CntinitError(f"--targets {target} is not a regular expression ({exc}): fix it, e.g. re:.*language_model.*\\.q_proj") from None
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


@dataclass
class Placement:
    """Where an offloaded model's weights live: accelerate's device map on `device`, then CPU
    memory, then `folder` on disk, within `max_memory` ({"cuda": bytes-or-"20GiB", "cpu": ...};
    a device left out gets what accelerate finds free)."""

    device: torch.device
    dtype: torch.dtype | str
    folder: Path
    max_memory: dict[str, str] = field(default_factory=dict)

    def arguments(self) -> dict:
        from accelerate.utils import get_max_memory

        free = get_max_memory()
        limits = {"cpu": self.max_memory.get("cpu", free["cpu"])}
        if self.device.type == "cuda":  # only this process's GPU, also under torchrun
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            limits = {index: self.max_memory.get("cuda", free[index])} | limits
        return {"device_map": "auto", "max_memory": limits, "offload_folder": str(self.folder), "dtype": self.dtype}


def offload_placement(scratch: contextlib.ExitStack, out: str | Path, offload: bool, max_memory: str | None,
                      device: torch.device, dtype: torch.dtype | str) -> Placement | None:
    """The Placement for --offload (None without it), its disk folder beside `out` (same
    filesystem, same space) and removed when `scratch` closes."""
    if not offload:
        if max_memory is not None:
            raise CntinitError("--max-memory limits where --offload puts the weights: add --offload")
        return None
    limits = parse_max_memory(max_memory)
    if "cuda" in limits and device.type != "cuda":
        raise CntinitError("--max-memory cuda=SIZE limits a GPU, but here --offload keeps the weights in CPU memory and on disk: "
                           "give --max-memory cpu=SIZE")
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = scratch.enter_context(tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.offload-", dir=parent))
    return Placement(device, dtype, Path(folder), limits)


def parse_max_memory(text: str | None) -> dict[str, str]:
    """'cuda=20GiB,cpu=64GiB' → {"cuda": "20GiB", "cpu": "64GiB"} (accelerate reads the sizes)."""
    if not text:
        return {}
    limits = {}
    for part in text.split(","):
        device, sep, size = part.strip().partition("=")
        if not sep or device not in ("cuda", "cpu") or not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size.strip(), re.IGNORECASE):
            raise CntinitError(f"--max-memory {text}: each entry is cuda=SIZE or cpu=SIZE with SIZE like 20GiB or 500MB, comma-separated")
        limits[device] = size.strip() if not size.strip().isdigit() else int(size)
    return limits


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


def context_length(model: nn.Module, tokenizer) -> int | None:
    """The longest sequence the model takes: its position table (RoBERTa-style models lose two
    slots to their padding offset) or the tokenizer's limit, whichever is smaller; None if neither says."""
    config = model.config
    model_type = getattr(config, "model_type", "") or ""
    offset = 2 if "roberta" in model_type or model_type == "camembert" else 0
    limits = [getattr(config, name) - offset for name in ("max_position_embeddings", "n_positions")
              if isinstance(getattr(config, name, None), int)]
    if isinstance(getattr(tokenizer, "model_max_length", None), int) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return min(limits) if limits else None


def resolve_device(device: str, option: str = "--device") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CntinitError(f"{option} cuda but no CUDA GPU is visible: use {option} cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise not_one_of(option, device, ("auto", "cpu", "cuda"))
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def place(net: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move `net` to `device` with its weights in `dtype`, as from_pretrained(dtype=...) holds them:
    float32 buffers stay float32. transformers computes RoPE's frequencies in float32 and keeps them
    so; `Module.to(bfloat16)` would round them, and every attention after them, away from the model
    a trainer runs. Half-precision buffers (the checkpoint's dtype) follow the weights."""
    net.to(device)
    for parameter in net.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
    for module in net.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(module, name, buffer.to(buffer_dtype(buffer, dtype)))


def buffer_dtype(buffer: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating buffer has in a model run in `dtype` (see `place`)."""
    return dtype if buffer.dtype in (torch.bfloat16, torch.float16) else buffer.dtype


def resolve_dtype(dtype: str, checkpoint: torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: the `checkpoint`'s dtype on GPU; float32 on CPU, where half precision is slow."""
    if dtype == "auto":
        return checkpoint if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise not_one_of("--dtype", dtype, ("auto", *DTYPES))
    return DTYPES[dtype]
