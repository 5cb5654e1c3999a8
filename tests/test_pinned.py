"""Pinned keys and manifests: what the cache and the on-disk formats hold for one fixed model must not
change when the code changes shape.

The model is written byte for byte by the test (config.json, a WordLevel tokenizer.json, weights
drawn from a seeded generator) rather than by save_pretrained, whose files carry the transformers
version: its files, and so every key below, depend on nothing installed. The expected values were
computed on the tree before the code moved into stage packages (commit 9e19013) and are written
here as they came out; a change that alters one is a change of a cache key or of a format, which
needs a format version (or cntinit's version, which every key holds) — not a new expected value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cntinit import capture, runner, solve
from cntinit.solve import Options

WORDS = "in the beginning god created heaven and earth was without form void let there be light saw that it good".split()
LINES = ["In the beginning God created the heaven and the earth", "And the earth was without form and void",
         "Let there be light", "And God saw the light that it was good", "the light was good", "God created light"]
HIDDEN, INTERMEDIATE = 16, 24


def write_pinned_model(directory: Path) -> Path:
    """A one-block Llama (16 wide, 1 key/value head) with a 22-word vocabulary, every file written here."""
    directory.mkdir(parents=True)
    vocab = {"[PAD]": 0, "[UNK]": 1} | {word: i + 2 for i, word in enumerate(WORDS)}
    special = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
               for token, i in list(vocab.items())[:2]]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": {"type": "Lowercase"},
                 "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]",
                                                                 "unk_token": "[UNK]", "model_max_length": 64}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab), "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    block = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (len(vocab), HIDDEN), block + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
              block + "self_attn.k_proj.weight": (8, HIDDEN), block + "self_attn.v_proj.weight": (8, HIDDEN),
              block + "self_attn.o_proj.weight": (HIDDEN, HIDDEN), block + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
              block + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN), block + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
              block + "input_layernorm.weight": (HIDDEN,), block + "post_attention_layernorm.weight": (HIDDEN,),
              "model.norm.weight": (HIDDEN,), "lm_head.weight": (len(vocab), HIDDEN)}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(shape) if len(shape) == 1 else torch.randn(*shape, generator=generator) * 0.2 for name, shape in shapes.items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    root = tmp_path_factory.mktemp("pinned")
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES))
    return write_pinned_model(root / "model"), data


def without(manifest: dict, *volatile: str) -> dict:
    """`manifest` without the fields that name a time, a path on this machine, or the bytes of float results
    (checksums, which follow the CPU's rounding): dotted names."""
    manifest = json.loads(json.dumps(manifest))
    for dotted in volatile:
        *parents, last = dotted.split(".")
        node = manifest
        for parent in parents:
            node = node[parent]
        del node[last]
    return manifest


EXPECTED = json.loads((Path(__file__).parent / "pinned.json").read_text())


def test_capture_key_store_manifest_and_solve_keys_are_pinned(pinned, tmp_path):
    model, data = pinned
    cache_dir = tmp_path / "cache"
    stats, hit = runner.cached_capture(model, data, buckets=2, device="cpu", cache_dir=cache_dir)
    assert not hit and stats.name == EXPECTED["capture_key"]
    manifest = json.loads((stats / "manifest.json").read_text())
    assert without(manifest, "created", "model.path", "data.sources", "files") == EXPECTED["store_manifest"]

    data_free, _ = runner.cached_solve(None, Options(mode="pissa", rank=4), model=model, targets="q_proj,v_proj", device="cpu",
                                       cache_dir=cache_dir)
    assert data_free.name == EXPECTED["data_free_solve_key"]
    # from a capture the key also holds the store manifest's checksum, which holds its time: the rest is pinned
    from_capture, _ = runner.cached_solve(stats, Options(mode="cnt-s", rank=4), device="cpu", cache_dir=cache_dir)
    inputs = json.loads(from_capture.with_suffix(".json").read_text())["inputs"]
    assert without(inputs, "capture") == EXPECTED["solve_inputs"]


def test_solve_manifests_are_pinned(pinned, tmp_path):
    """A CNT solve (buckets), a gradient one (its resolved options), EVA (its redistributed ranks) and a
    data-free LoftQ (a quantized base)."""
    model, data = pinned
    stats = capture(model, data, tmp_path / "stats", buckets=2, device="cpu")
    gradients = capture(model, data, tmp_path / "gradients", device="cpu", gradients=True)
    for mode, source, params in (("cnt-s", stats, {}), ("lora-ga", gradients, {"alpha": 8.0}), ("eva", stats, {})):
        out = solve(source, tmp_path / mode, mode=mode, rank=4, device="cpu", **params)
        manifest = json.loads((out / "manifest.json").read_text())
        got = without(manifest, "created", "capture.path", "capture.manifest_sha256", "model.path", "files")
        assert got == EXPECTED["solve_manifests"][mode], mode
    loftq = solve(None, tmp_path / "loftq", mode="loftq", rank=2, model=model, targets="down_proj", device="cpu")
    manifest = json.loads((loftq / "manifest.json").read_text())
    assert without(manifest, "created", "model.path", "files") == EXPECTED["solve_manifests"]["loftq"]
