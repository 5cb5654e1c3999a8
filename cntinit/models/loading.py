"""Loading a model from a local path or a Hub id's cached snapshot: a transformers model (the class
its config.json names) with its tokenizer, or a diffusers pipeline; and what the manifests record of it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from torch import nn

from .. import hub
from ..errors import CntinitError, first_line
from . import pipelines, weight_files
from .source import locate

if TYPE_CHECKING:
    from .placement import Placement

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


def load(path: str | Path, trust_remote_code: bool = False, placement: "Placement | None" = None, empty: bool = False,
         skeleton: bool = False):
    """(model, tokenizer or None) from a local directory or a Hub id (source.locate), in the checkpoint's own dtype, eval mode.

    The class is the one config.json names (so module paths match what trainers load),
    falling back to AutoModel. A diffusers pipeline directory loads as `pipelines.DiffusionParts`.
    A model without tokenizer files (a vision encoder) gets None. With a `placement`, accelerate
    spreads the weights over the device, then CPU memory, then disk, within its limits. `empty`
    builds the model without reading its weights: parameters on the meta device, buffers real
    (a layerwise capture reads the weights itself, block by block). A `skeleton` is an empty model
    whose modules are only named and read by name (solve, export): its weights are not initialized and
    its tokenizer is None — parsing a 3 MB tokenizer.json took a third of an export, initializing the
    meta weights a seventh.
    """
    path = locate(path, trust_remote_code=trust_remote_code)
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
        if empty or skeleton:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False), _uninitialized() if skeleton else contextlib.nullcontext():
                model = (transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code) if model_class is transformers.AutoModel
                         else model_class._from_config(config))
            model.tie_weights()  # as from_pretrained does: a tied output layer shares the embeddings' parameter
        else:
            spread = placement.arguments() if placement is not None else {}
            model, info = model_class.from_pretrained(path, dtype=spread.pop("dtype", "auto"), trust_remote_code=trust_remote_code,
                                                         output_loading_info=True, ignore_mismatched_sizes=True, **spread)
            weight_files.refuse_incomplete(path, info["missing_keys"], info["mismatched_keys"])
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
    if skeleton:
        return model, None
    return model, (_processor(path, trust_remote_code) if modality(model) == "vlm" else _tokenizer(path, trust_remote_code))


def _uninitialized():
    """transformers' switch that leaves a new model's weights as they are created (where it has one)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _tokenizer(path: Path, trust_remote_code: bool):
    """The model's tokenizer, or None where its directory has no tokenizer files (a vision encoder)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CntinitError(f"could not load the tokenizer at {path}: {first_line(exc)} — its tokenizer files are damaged or of "
                           "another version: put the model's own tokenizer files (save_pretrained's) beside its weights") from None


def _processor(path: Path, trust_remote_code: bool):
    """A vision-language model's processor (its tokenizer, image processor and chat template), which
    expands image placeholders exactly as its trainer's collator does."""
    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise CntinitError(f"could not load the processor of the vision-language model at {path}: {first_line(exc)} — put its own "
                           "processor files (processor_config.json or preprocessor_config.json, the tokenizer files, the chat "
                           "template) beside its weights, as its save_pretrained wrote them") from None


def record(net: nn.Module, path: str | Path, fingerprint: str) -> dict:
    """The model as the manifests record it: where it is (and, for a snapshot in the Hugging Face cache,
    its Hub id and commit, which export names as the base model); a pipeline records its family
    as its layout (sdxl, flux, sd3; SD 1.x/2.x none), which export's kohya names follow."""
    entry = {"path": str(Path(path).absolute()), "class": type(net).__name__, "fingerprint": fingerprint, "kind": modality(net)}
    entry |= hub.origin(path)
    if isinstance(net, pipelines.DiffusionParts) and net.family.name != "sd":
        entry["layout"] = net.family.name
    return entry


def modality(model: nn.Module) -> str:
    """What the model reads: "diffusion" (a pipeline), "vision" (pixel_values), "vlm" (text with images:
    a language model with a vision tower, whose config nests a vision_config) or "text"."""
    if isinstance(model, pipelines.DiffusionParts):
        return "diffusion"
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return "vision"
    return "vlm" if getattr(getattr(model, "config", None), "vision_config", None) is not None else "text"


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
