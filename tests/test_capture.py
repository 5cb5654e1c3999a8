"""Capture on tiny Llama-, BERT- and GPT-2-style models against an independent computation."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import cntinit
from cntinit.errors import CntinitError
from conftest import TEXTS, build_tiny, run


def reference(model_dir, texts, seq_len, names):
    """float64 model, one sequence at a time (no padding), inputs gathered by our own hooks."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).double().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows = {n: [] for n in names}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: rows[n].append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=seq_len, return_tensors="pt")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def load_key(store, key):
    return {name: t.double() for name, t in store.tensors(key).items()}


def assert_stats_match(store, ref, name):
    key = store.manifest["modules"][name]["key"]
    got = load_key(store, key)
    x = ref[name]
    torch.testing.assert_close(got["xxt"], x.T @ x, rtol=1e-4, atol=1e-4 * float((x.T @ x).abs().max()))
    torch.testing.assert_close(got["sum"], x.sum(0), rtol=1e-4, atol=1e-4 * float(x.abs().sum(0).max()))
    assert int(got["count"]) == x.shape[0]


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_statistics_equal_independent_computation(tiny, text_jsonl, tmp_path, kind):
    out = cntinit.capture(tiny[kind], text_jsonl, tmp_path / "s", batch_size=5, seq_len=24)
    store = cntinit.Store(out)
    names = list(store.manifest["modules"])
    ref = reference(tiny[kind], TEXTS, 24, names)
    for name in names:
        assert_stats_match(store, ref, name)
    assert store.manifest["data"]["tokens"] == ref[names[0]].shape[0]


def test_gpt2_conv1d_shapes_are_out_by_in(tiny, text_jsonl, tmp_path):
    store = cntinit.Store(cntinit.capture(tiny["gpt2"], text_jsonl, tmp_path / "s", targets="c_attn,c_proj"))
    entry = store.manifest["modules"]["transformer.h.0.attn.c_attn"]
    assert (entry["in_features"], entry["out_features"], entry["layer"]) == (64, 192, "Conv1D")
    assert store.manifest["modules"]["transformer.h.0.mlp.c_proj"]["in_features"] == 256


def test_padding_never_counted(tiny, text_jsonl, tmp_path):
    one = cntinit.Store(cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "one", batch_size=1))
    padded = cntinit.Store(cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "pad", batch_size=12))
    for key in one.keys:
        a, b = load_key(one, key), load_key(padded, key)
        assert int(a["count"]) == int(b["count"])
        torch.testing.assert_close(b["xxt"], a["xxt"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b["sum"], a["sum"], rtol=1e-4, atol=1e-3)


def test_shared_inputs_stored_once(tiny, text_jsonl, tmp_path):
    store = cntinit.Store(cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "s"))
    modules = store.manifest["modules"]
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    assert {modules[attn + p]["key"] for p in ("q_proj", "k_proj", "v_proj")} == {attn + "q_proj"}
    assert modules[attn + "o_proj"]["key"] == attn + "o_proj"
    assert modules[mlp + "up_proj"]["key"] == modules[mlp + "gate_proj"]["key"] != modules[mlp + "down_proj"]["key"]
    assert "lm_head" not in modules  # all-linear skips the output head, as PEFT does
    assert len(store.keys) == 2 * 4  # qkv, o, gate/up, down per layer
    with safe_open(store.path / "stats-00001.safetensors", "pt") as f:
        assert len(list(f.keys())) == 3 * len(store.keys)


def test_buckets_are_consecutive_slices(tiny, text_jsonl, tmp_path):
    whole = cntinit.Store(cntinit.capture(tiny["bert"], text_jsonl, tmp_path / "w", buckets=3, targets="query"))
    key = whole.keys[0]
    t = load_key(whole, key)
    torch.testing.assert_close(t["bucket_xxt"].sum(0), t["xxt"], rtol=1e-5, atol=1e-5)
    assert int(t["bucket_count"].sum()) == int(t["count"])
    middle = tmp_path / "middle.jsonl"
    middle.write_text("".join(json.dumps({"text": s}) + "\n" for s in TEXTS[4:8]))
    part = cntinit.Store(cntinit.capture(tiny["bert"], middle, tmp_path / "m", targets="query"))
    torch.testing.assert_close(t["bucket_xxt"][1], load_key(part, key)["xxt"], rtol=1e-5, atol=1e-3)


def test_merge_of_shards_equals_one_run(tiny, text_jsonl, tmp_path):
    halves = []
    for i, texts in enumerate((TEXTS[:5], TEXTS[5:])):
        f = tmp_path / f"h{i}.jsonl"
        f.write_text("".join(json.dumps({"text": s}) + "\n" for s in texts))
        halves.append(cntinit.capture(tiny["llama"], f, tmp_path / f"h{i}", targets="q_proj,down_proj"))
    merged = cntinit.Store(cntinit.merge(halves, tmp_path / "merged"))
    whole = cntinit.Store(cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "whole", targets="q_proj,down_proj"))
    assert merged.manifest["data"]["tokens"] == whole.manifest["data"]["tokens"]
    for key in whole.keys:
        a, b = load_key(whole, key), load_key(merged, key)
        assert int(a["count"]) == int(b["count"])
        torch.testing.assert_close(b["xxt"], a["xxt"], rtol=1e-5, atol=1e-3)


def test_merge_refuses_other_models_and_targets(tiny, text_jsonl, tmp_path):
    a = cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "a", targets="q_proj")
    b = cntinit.capture(tiny["llama"], text_jsonl, tmp_path / "b", targets="o_proj")
    other = build_tiny("llama", tmp_path / "llama-seed1", seed=1)
    c = cntinit.capture(other, text_jsonl, tmp_path / "c", targets="q_proj")
    with pytest.raises(CntinitError, match="other target modules"):
        cntinit.merge([a, b], tmp_path / "ab")
    with pytest.raises(CntinitError, match="other model weights"):
        cntinit.merge([a, c], tmp_path / "ac")
    assert not (tmp_path / "ab").exists() and not (tmp_path / "ac").exists()


def test_chat_messages_pack_and_float64(tiny, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]}) + "\n" for t in TEXTS))
    store = cntinit.Store(cntinit.capture(tiny["llama"], f, tmp_path / "s", targets="o_proj", pack=True, seq_len=16, accumulate="float64"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    rendered = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f.read_text().splitlines()]
    total = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered)
    assert store.manifest["data"]["tokens"] == total
    assert store.manifest["data"]["sequences"] == -(-total // 16)
    assert load_key(store, store.keys[0])["xxt"].shape == (64, 64)
    assert store.tensors(store.keys[0])["xxt"].dtype == torch.float64


def test_samples_longer_than_the_model_context_are_truncated_to_it(tiny, tmp_path, capsys):
    """The tiny models have 512 positions: --seq-len 600 would crash the forward pass, so capture uses 512 and says so."""
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": " ".join(["light"] * 700)}) + "\n" + json.dumps({"text": "Day one."}) + "\n")
    for kind in ("bert", "gpt2"):
        code, out, err = run(capsys, "capture", tiny[kind], "-d", tmp_path / "long.jsonl", "-o", tmp_path / kind, "--seq-len", "600")
        assert code == 0 and "--seq-len 600 is longer than the model's context (512 tokens): using 512" in err
        assert "1 of 2 samples are longer than --seq-len 512 tokens and were truncated" in err
        manifest = json.loads((tmp_path / kind / "manifest.json").read_text())
        short = len(transformers.AutoTokenizer.from_pretrained(tiny[kind])("Day one.")["input_ids"])
        assert manifest["capture"]["seq_len"] == 512 and manifest["data"]["tokens"] == 512 + short


def test_context_length_knows_the_roberta_padding_offset():
    from cntinit.models.loading import context_length

    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=130))
    assert context_length(roberta, tokenizer=None) == 128


def test_regex_targets_pick_whole_paths(tiny):
    import transformers

    from cntinit.models import linears

    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    chosen = linears.select_targets(net, r"re:model\.layers\.1\.self_attn\.(q|v)_proj,down_proj")
    assert sorted(chosen) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                              "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(CntinitError, match="is not a regular expression"):
        linears.select_targets(net, "re:model.(")
    with pytest.raises(CntinitError, match="matched no linear module"):
        linears.select_targets(net, r"re:vision_tower\..*")
    for empty in ("", ",,,", " , "):  # were taken (as what?)
        with pytest.raises(CntinitError, match="--targets names no module: give module-name suffixes"):
            linears.select_targets(net, empty)
    for evil in ("re:(.|.)*!", "re:(a+)+b", r"re:(\w*)*\.x"):  # ran for minutes: exponential backtracking over a module name
        with pytest.raises(CntinitError, match="repeats a group that itself repeats or alternates"):
            linears.select_targets(net, evil)


def test_half_precision_capture_keeps_float32_buffers_as_from_pretrained_does(tiny, tmp_path):
    """A capture in bf16 runs the model a trainer loads with from_pretrained(dtype=bfloat16): RoPE's
    frequencies stay float32 there. `Module.to(bfloat16)` rounded them (found on an H200, where bf16
    is the default: --offload, which never cast, differed from the normal capture by 1.3e-2); the
    normal, --offload and --layerwise captures now equal the reference, one verse at a time."""
    model_dir = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(tiny["llama"]).to(torch.bfloat16).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(tiny["llama"]).save_pretrained(model_dir)
    verses = [json.loads(line)["text"] for line in open(cntinit.embedded.data_file())][:6]
    data = tmp_path / "verses.jsonl"
    data.write_text("".join(json.dumps({"text": v * 4}) + "\n" for v in verses))  # long rows: RoPE's rounding grows with position
    net = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    target = "model.layers.1.self_attn.q_proj"  # its input has been through block 0's attention
    rows = []
    handle = net.get_submodule(target).register_forward_pre_hook(lambda m, a: rows.append(a[0][0].double()))
    with torch.no_grad():
        for verse in verses:
            net(**tokenizer(verse * 4, truncation=True, max_length=256, return_tensors="pt"))
    handle.remove()
    x = torch.cat(rows)
    expected = x.T @ x
    for how in ({}, {"offload": True, "max_memory": "cpu=1MB"}, {"layerwise": True}):
        store = cntinit.Store(cntinit.capture(model_dir, data, tmp_path / f"s{len(how)}", targets="q_proj", batch_size=1,
                                              seq_len=256, dtype="bfloat16", **how))
        got = load_key(store, store.manifest["modules"][target]["key"])["xxt"]
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5, how
