"""Gradient capture (`capture --gradients`) and the gradient inits (lora-ga, lora-one): the summed
gradient against plain backward, LoRA-GA against PEFT's own, LoRA-One against the paper's formulas."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from cntinit import capture, export, merge, runner, solve
from cntinit.capture import gradients
from cntinit.capture.feeds import samples as data_mod
from cntinit.solve.solution import Solution
from cntinit.storage.store import Store

from conftest import TEXTS, assert_refused, run
from test_checkpoint import interrupt_at

TARGETS = "q_proj,v_proj,down_proj"


def _reference_batches(model_dir, texts: list[str], batch_size: int, names) -> tuple[dict, int]:
    """METHODS.md's G times K, float64: over the batches the capture forms (right-padded, longest first),
    plain `loss.backward()` of transformers' own mean loss with labels −100 on padding; and K."""
    net = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    sequences = data_mod.tokenize([data_mod.Sample(t, "t") for t in texts], tokenizer, 512)
    count = 0
    for ids, mask, _ in data_mod.batches(sequences, batch_size, tokenizer.pad_token_id or 0):
        net(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        count += 1
    return {name: net.get_submodule(name).weight.grad for name in names}, count


def _reference_prompted(model_dir, records: list[dict], names) -> tuple[dict, int]:
    """Σ over samples (one per batch) of the mean loss gradient with labels −100 on the prompt: the
    tokens the prompt alone tokenizes to, as long as they agree with the whole text's."""
    net = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokens = 0
    for record in records:
        ids = tokenizer(record["prompt"] + record["completion"], return_tensors="pt")["input_ids"]
        alone = tokenizer(record["prompt"])["input_ids"]
        agree = 0
        while agree < min(len(alone), ids.shape[1]) and alone[agree] == ids[0, agree]:
            agree += 1
        labels = ids.clone()
        labels[:, :agree] = -100
        net(input_ids=ids, labels=labels).loss.backward()
        tokens += int((labels[:, 1:] != -100).sum())
    return {name: net.get_submodule(name).weight.grad for name in names}, tokens


def _close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    return float((got.double() - expected).norm() / expected.norm()) < tolerance


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_gradients_equal_plain_backward_and_leave_the_statistics_as_they_were(tiny, tmp_path):
    """Padded batches of 5, with and without --gradient-checkpointing: the stored sum is Σ over batches of
    transformers' own mean-loss gradient (float64 reference), and the statistics equal a plain capture."""
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    plain = Store(capture(tiny["llama"], data, tmp_path / "plain", targets=TARGETS, batch_size=5))
    reference, count = _reference_batches(tiny["llama"], TEXTS, 5, plain.manifest["modules"])
    for checkpointing in (False, True):
        store = Store(capture(tiny["llama"], data, tmp_path / f"g{checkpointing}", targets=TARGETS, batch_size=5, gradients=True,
                             gradient_checkpointing=checkpointing, accumulate="float64"))
        assert store.manifest["gradients"]["batches"] == count == 3 and store.manifest["capture"]["gradients"] is True
        assert store.manifest["gradients"]["tokens"] == sum(len(t) - 1 for t in data_mod.tokenize(
            [data_mod.Sample(t, "t") for t in TEXTS], transformers.AutoTokenizer.from_pretrained(tiny["llama"]), 512))
        for name, expected in reference.items():
            assert _close(store.gradient(name), expected, 1e-5), name
        for key in plain.keys:
            for part, value in plain.tensors(key).items():
                torch.testing.assert_close(store.tensors(key)[part].float(), value.float(), rtol=1e-5, atol=1e-5)


def test_prompt_tokens_carry_no_label(tiny, tmp_path):
    """prompt/completion records: only completion tokens are predicted; the prompt still feeds the statistics."""
    records = [{"prompt": t[: len(t) // 2], "completion": t[len(t) // 2 :]} for t in TEXTS]
    data = _jsonl(tmp_path / "pc.jsonl", records)
    store = Store(capture(tiny["llama"], data, tmp_path / "g", targets="v_proj", batch_size=1, gradients=True, accumulate="float64"))
    reference, tokens = _reference_prompted(tiny["llama"], records, store.manifest["modules"])
    assert store.manifest["gradients"]["tokens"] == tokens and store.manifest["gradients"]["batches"] == len(records)
    for name, expected in reference.items():
        assert _close(store.gradient(name), expected, 1e-5), name
    whole = Store(capture(tiny["llama"], _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS]), tmp_path / "w", targets="v_proj"))
    assert whole.manifest["stats"][whole.keys[0]]["count"] == store.manifest["stats"][store.keys[0]]["count"]


def test_labels_follow_the_ids_device():
    """A layerwise capture keeps the mask and prompt flags on the CPU and the ids on the GPU (the first
    H100 run failed there); the meta device stands in for the GPU: the labels land on the ids' device."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    mask, targets = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert gradients.labels(ids, mask, targets).tolist() == [[6, 7, 8, -100], [10, 11, -100, -100]]
    assert gradients.labels(ids.to("meta"), mask, targets).device.type == "meta"


def test_prompt_length_of_chat_and_text_records(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    chat = data_mod.Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "light"}], "x:1",
                           [{"role": "user", "content": "hi"}])
    text = data_mod.Sample("Let there be light.", "x:2", "Let there")
    seq_chat, seq_text = data_mod.tokenize([chat, text], tokenizer, 64)
    rendered = tokenizer.apply_chat_template(chat.prompt, tokenize=False, add_generation_prompt=True)
    assert seq_chat.prompt == len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) < len(seq_chat)
    assert seq_text.prompt == len(tokenizer("Let there")["input_ids"]) - 1  # the prompt's own [SEP] is not in the whole text
    ids, mask, targets = next(data_mod.batches([seq_text], 1, 0))
    assert targets[0].tolist() == [i >= seq_text.prompt for i in range(len(seq_text))]


def test_shards_merge_into_one_gradient_capture(tiny, calibration, tmp_path):
    """One sample per batch, so the shards' batches are the whole run's: the merge equals it."""
    options = dict(targets="q_proj,v_proj", gradients=True, accumulate="float64", batch_size=1)
    whole = Store(capture(tiny["llama"], calibration, tmp_path / "whole", **options))
    parts = [capture(tiny["llama"], calibration, tmp_path / f"s{i}", shard=f"{i}/2", **options) for i in range(2)]
    merged = Store(merge(parts, tmp_path / "merged"))
    assert merged.manifest["gradients"]["batches"] == whole.manifest["gradients"]["batches"] == 80
    assert merged.manifest["gradients"]["tokens"] == whole.manifest["gradients"]["tokens"]
    assert merged.manifest["gradients"]["mean_loss"] == pytest.approx(whole.manifest["gradients"]["mean_loss"], rel=1e-9)
    for name in whole.manifest["modules"]:
        assert _close(merged.gradient(name), whole.gradient(name).double(), 1e-6), name
    plain = capture(tiny["llama"], calibration, tmp_path / "plain", targets="q_proj,v_proj", shard="0/2")
    with pytest.raises(Exception, match="holds gradients and the other stores do not"):
        merge([parts[0], plain], tmp_path / "mixed")


def test_an_interrupted_gradient_capture_resumes_to_the_same_sums(tiny, calibration, tmp_path, capsys, monkeypatch):
    args = ["capture", tiny["llama"], "--data", calibration, "--targets", "q_proj,down_proj", "--seq-len", "32", "--batch-size", "8",
            "--gradients", "--checkpoint-every", "2"]
    stop_at = interrupt_at(monkeypatch, 5)
    code, _, _ = run(capsys, *args, "-o", tmp_path / "resumed")
    assert code == 130 and stop_at()
    monkeypatch.undo()
    code, _, err = run(capsys, *args, "-o", tmp_path / "resumed")
    assert code == 0 and "resuming from the checkpoint" in err and "5 batches already summed" in err, err
    assert run(capsys, *args, "-o", tmp_path / "whole")[0] == 0
    resumed, whole = Store(tmp_path / "resumed"), Store(tmp_path / "whole")
    assert resumed.manifest["gradients"] == whole.manifest["gradients"]
    for name in whole.manifest["modules"]:
        assert torch.equal(resumed.gradient(name), whole.gradient(name)), name


def _exact_svd(m, q=None, niter=None):
    """torch.svd_lowrank's (U, S, V) from a full SVD, each u's largest entry positive: PEFT's own LoRA-GA
    with the randomized SVD (q = 4r < 64 here) replaced by the exact one it approximates."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return (u * sign).to(m.dtype), s.to(m.dtype), (vh.mT * sign).to(m.dtype)


@pytest.mark.parametrize("direction,scale,alpha,rslora", [("ArB2r", "stable", 8.0, False), ("A2rBr", "weight_svd", 16.0, True),
                                                          ("ArBr", "gd_scale", 8.0, False), ("ArB2r", "unit", 4.0, False)])
def test_lora_ga_equals_peft(direction, scale, alpha, rslora, tiny, tmp_path, monkeypatch):
    """PEFT's preprocess_loraga + get_peft_model on the same batches (one backward each, transformers'
    mean loss): its lora_A, lora_B and residual base weights equal our export's; the exported adapter on
    the exported base computes what PEFT's in-process model does."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    sequences = data_mod.tokenize([data_mod.Sample(t, "t") for t in TEXTS], tokenizer, 512)
    batches = list(data_mod.batches(sequences, 5, tokenizer.pad_token_id or 0))
    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float64)
    config = peft.LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS.split(","), init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for ids, mask, _ in batches:
            net(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    peft.preprocess_loraga(net, config, train_step)
    ids, mask, _ = batches[0]
    monkeypatch.setattr(torch, "svd_lowrank", _exact_svd)
    theirs = peft.get_peft_model(net, config)
    monkeypatch.undo()

    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    store = capture(tiny["llama"], data, tmp_path / "g", targets=TARGETS, batch_size=5, gradients=True, accumulate="float64")
    solved = solve(store, tmp_path / "ga", mode="lora-ga", rank=4, alpha=alpha, rslora=rslora or None, direction=direction, scale=scale)
    exported = export(solved, tmp_path / "x", rslora=rslora, check=True)
    ours = load_file(exported / "adapter_model.safetensors")
    base = transformers.AutoModelForCausalLM.from_pretrained(exported / "base", dtype=torch.float64)
    for name in Solution(solved).modules:
        layer = theirs.base_model.model.get_submodule(name)
        for part in ("A", "B"):
            expected = getattr(layer, f"lora_{part}")["default"].weight.detach()
            got = ours[f"base_model.model.{name}.lora_{part}.weight"].double()
            assert float((got - expected).norm() / expected.norm()) < 1e-5, (name, part)
        expected = layer.base_layer.weight.detach()
        assert float((base.get_submodule(name).weight.detach() - expected).norm() / expected.norm()) < 1e-5, name
    loaded = peft.PeftModel.from_pretrained(base, exported)
    with torch.no_grad():
        want, got = theirs(input_ids=ids, attention_mask=mask).logits, loaded(input_ids=ids, attention_mask=mask).logits
    assert float((got - want).norm() / want.norm()) < 1e-6


def test_lora_one_follows_the_paper(tiny, calibration, tmp_path):
    """B = U_r √S_r / √s₁ / √γ, A = √S_r V_rᵀ / √s₁ / √γ from the SVD of −G (G the mean gradient), base
    unchanged: the initial model is W − s/(γ s₁)·[G]_r (offset). Checked up to each component's sign."""
    store = Store(capture(tiny["llama"], calibration, tmp_path / "g", targets="v_proj,up_proj", gradients=True, accumulate="float64"))
    solved = Solution(solve(store.path, tmp_path / "one", mode="lora-one", rank=4, alpha=16.0, rslora=True))
    assert solved.manifest["init"] == "offset" and solved.manifest["params"]["stable_gamma"] == 128.0
    s = 16.0 / 4**0.5
    exported = load_file(export(solved.path, tmp_path / "x") / "adapter_model.safetensors")  # α and rsLoRA: the solve's
    for name, (b, a) in solved.factors().items():
        grad = store.gradient(name).double() / store.manifest["gradients"]["batches"]
        u, sv, vh = torch.linalg.svd(-grad)
        root = (sv[:4] / sv[0]).sqrt() / 128.0**0.5
        want_b, want_a = u[:, :4] * root, root[:, None] * vh[:4]
        got_b = exported[f"base_model.model.{name}.lora_B.weight"].double()
        got_a = exported[f"base_model.model.{name}.lora_A.weight"].double()
        sign = torch.sign((got_b * want_b).sum(0))
        torch.testing.assert_close(got_b, want_b * sign, rtol=0, atol=1e-6 * float(want_b.abs().max()))
        torch.testing.assert_close(got_a, want_a * sign[:, None], rtol=0, atol=1e-6 * float(want_a.abs().max()))
        step = s / (128.0 * sv[0]) * (u[:, :4] * sv[:4]) @ vh[:4]  # = −s/(γ s₁)·[G]_r: a gradient step
        assert float((b.double() @ a.double() - step).norm() / step.norm()) < 1e-6
        row = solved.report["modules"][name]
        assert row["kept"] == pytest.approx(float(sv[:4].square().sum() / sv.square().sum()), rel=1e-6)
        assert row["delta_norm"] == pytest.approx(float(grad.norm()), rel=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_layerwise_gradients_equal_the_whole_model_s(kind, tiny, tmp_path):
    """--gradients --layerwise: forward block by block, the loss from the last block's output, then
    backward block by block from each kept input: the same gradient and statistics as the capture
    that runs the whole model, and the float64 reference (GPT-2: Conv1D weights, tuple outputs).
    Prompt/completion records, one per batch, with the hidden states waiting on the CPU."""
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    prompted = _jsonl(tmp_path / "pc.jsonl", [{"prompt": t[: len(t) // 2], "completion": t[len(t) // 2 :]} for t in TEXTS])
    targets = TARGETS if kind == "llama" else "c_attn,c_proj"
    for name, source, batch in (("text", data, 5), ("prompted", prompted, 1)):
        whole = Store(capture(tiny[kind], source, tmp_path / f"{name}-whole", targets=targets, batch_size=batch, gradients=True,
                              accumulate="float64"))
        layerwise = Store(capture(tiny[kind], source, tmp_path / f"{name}-layerwise", targets=targets, batch_size=batch, gradients=True,
                                  accumulate="float64", layerwise=True, activations_device="cpu"))
        assert layerwise.manifest["gradients"] == whole.manifest["gradients"]
        assert layerwise.manifest["modules"] == whole.manifest["modules"] and layerwise.keys == whole.keys
        for module in whole.manifest["modules"]:
            assert _close(layerwise.gradient(module), whole.gradient(module).double(), 1e-6), module
        for key in whole.keys:
            for part, value in whole.tensors(key).items():
                torch.testing.assert_close(layerwise.tensors(key)[part], value, rtol=1e-6, atol=1e-6)
    reference, count = _reference_batches(tiny[kind], TEXTS, 5, whole.manifest["modules"])
    text = Store(tmp_path / "text-layerwise")
    assert text.manifest["gradients"]["batches"] == count
    for module, expected in reference.items():
        assert _close(text.gradient(module), expected if kind == "llama" else expected.T, 1e-5), module  # Conv1D holds Wᵀ


def test_smollm2_layerwise_gradients_equal_the_whole_model_s(smollm2, tmp_path):
    """Real weights (30 blocks, GQA, the output layer tied to the embeddings, read from their one
    stored copy): targets in blocks 3 and 15, so the backward runs through the 15 blocks above."""
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS[:6]])
    targets = r"re:model\.layers\.(3|15)\.(self_attn\.q_proj|mlp\.down_proj)"
    whole = Store(capture(smollm2, data, tmp_path / "whole", targets=targets, batch_size=3, gradients=True))
    layerwise = Store(capture(smollm2, data, tmp_path / "layerwise", targets=targets, batch_size=3, gradients=True, layerwise=True))
    assert layerwise.manifest["gradients"]["tokens"] == whole.manifest["gradients"]["tokens"]
    assert layerwise.manifest["gradients"]["mean_loss"] == pytest.approx(whole.manifest["gradients"]["mean_loss"], rel=1e-6)
    for module in whole.manifest["modules"]:
        assert _close(layerwise.gradient(module), whole.gradient(module).double(), 1e-5), module
    for key in whole.keys:
        torch.testing.assert_close(layerwise.tensors(key)["xxt"], whole.tensors(key)["xxt"], rtol=1e-5, atol=1e-4)


def test_gradient_refusals(tiny, captured, calibration, tmp_path, capsys):
    assert_refused(capsys, ["capture", tiny["bert"], "--data", calibration, "--gradients"], "causal language model", tmp_path / "a")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, "--gradient-checkpointing"], "add --gradients", tmp_path / "b")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, "--gradients", "--offload"], "use --layerwise", tmp_path / "c")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, "--gradients", "--layerwise", "--gradient-checkpointing"],
                   "leave out --gradient-checkpointing", tmp_path / "c")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, "--gradients", "--layerwise", "--targets", "v_proj,lm_head"],
                   "lm_head lies outside them", tmp_path / "c")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", calibration, "--gradients", "--pack", "--data",
                            _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])], "leave out --pack", tmp_path / "d")
    assert_refused(capsys, ["solve", captured["llama"], "--mode", "lora-ga"], "capture again with --gradients", tmp_path / "e")
    assert_refused(capsys, ["solve", captured["llama"], "--mode", "cnt-s", "--direction", "ArBr"], "--direction applies to --mode lora-ga",
                   tmp_path / "f")
    store = capture(tiny["llama"], calibration, tmp_path / "g", targets="v_proj", gradients=True, max_samples=8)
    capsys.readouterr()
    assert_refused(capsys, ["solve", store, "--mode", "lora-ga", "--rank", "17", "-q"], "lower --rank to 16", tmp_path / "h")
    assert_refused(capsys, ["solve", store, "--mode", "lora-one", "--scale", "weight_svd"], "--scale", tmp_path / "i")
    assert_refused(capsys, ["solve", store, "--mode", "lora-ga", "--vas"], "sized for one rank", tmp_path / "j")
    assert_refused(capsys, ["solve", store, "--mode", "lora-ga", "--stable-gamma", "nan"], "--stable-gamma", tmp_path / "k")
    assert_refused(capsys, ["solve", store, "--mode", "lora-one", "--stable-gamma", "1e-320"],  # was taken
                   "--stable-gamma must be from 1e-06 to 1e+12 (B and A shrink by √γ), got 1e-320", tmp_path / "k")
    assert_refused(capsys, ["solve", store, "--mode", "lora-ga", "--alpha", "1e-300", "--rank", "4"],  # was taken
                   "--alpha 1e-300 gives the scale α/r = 2.5e-301 at rank 4, outside [0.0001, 10000]", tmp_path / "k")
    code, out, _ = run(capsys, "inspect", store)
    assert code == 0 and "gradients  of every module, over 1 batches and" in out
    solved = solve(store, tmp_path / "ga", mode="lora-ga", rank=4, alpha=8.0)
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--alpha", "4"], "export with --alpha 8", tmp_path / "l")
    assert_refused(capsys, ["export", solved, "--rslora"], "not --alpha 4 --rslora", tmp_path / "l")
    code, out, _ = run(capsys, "export", solved, "-o", tmp_path / "m")
    assert code == 0 and json.loads((tmp_path / "m" / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    broken = tmp_path / "broken"  # a NaN in the output head: the loss, and every gradient, is NaN
    net = transformers.AutoModelForCausalLM.from_pretrained(tiny["llama"])
    with torch.no_grad():
        net.lm_head.weight[0, 0] = float("nan")
    net.save_pretrained(broken)
    transformers.AutoTokenizer.from_pretrained(tiny["llama"]).save_pretrained(broken)
    assert_refused(capsys, ["capture", broken, "--data", calibration, "--targets", "v_proj", "--gradients", "-q"],
                   "came out NaN or Inf", tmp_path / "n")


def test_smollm2_gradients_equal_plain_backward(smollm2, tmp_path):
    """Real weights (30 blocks, GQA, tied embeddings): targets in two blocks, padded batches; the
    backward runs through every block above them."""
    texts = TEXTS[:6]
    data = _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    targets = r"re:model\.layers\.(0|15)\.(self_attn\.q_proj|mlp\.down_proj)"
    store = Store(capture(smollm2, data, tmp_path / "g", targets=targets, batch_size=3, gradients=True, accumulate="float64"))
    assert len(store.manifest["modules"]) == 4
    reference, count = _reference_batches(smollm2, texts, 3, store.manifest["modules"])
    assert store.manifest["gradients"]["batches"] == count == 2
    for name, expected in reference.items():
        assert _close(store.gradient(name), expected, 1e-4), name


def test_a_recipe_captures_gradients_once_for_every_mode(tiny, calibration, tmp_path, capsys, monkeypatch):
    """One --gradients capture serves lora-ga, lora-one and cnt-s; exports take α from the gradient solves.
    Older cache keys stay: `gradients` enters a capture key only when on, the gradient options a solve key only when set."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({
        "model": str(tiny["llama"]), "targets": "q_proj,v_proj,down_proj", "out": str(tmp_path / "out"),
        "capture": {"data": str(calibration), "seq_len": 32, "gradients": True},
        "solves": [{"mode": "lora-ga", "rank": 4, "alpha": 8}, {"mode": "lora-one", "rank": 4, "alpha": 16, "rslora": True},
                   {"mode": "cnt-s", "rank": 4}],
        "exports": [{"format": "peft", "check": True}]}))
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("CNTINIT_CACHE", str(cache_dir))
    code, stdout, err = run(capsys, "run", recipe, "--json", "-q")
    assert code == 0, err
    stages = {row["name"]: row for row in json.loads(stdout)["stages"]}
    assert all(stages[f"{name}/peft"]["check"] < 1e-5 for name in ("lora-ga-r4", "lora-one-r4", "cnt-s-r4"))
    configs = {name: json.loads((Path(stages[f"{name}/peft"]["path"]) / "adapter_config.json").read_text())
               for name in ("lora-ga-r4", "lora-one-r4")}
    assert (configs["lora-ga-r4"]["lora_alpha"], configs["lora-one-r4"]["lora_alpha"], configs["lora-one-r4"]["use_rslora"]) == (8, 16, True)
    keys: dict[str, list] = {}
    for made_of in sorted(cache_dir.glob("*/*.json")):
        keys.setdefault(made_of.parent.name, []).append(json.loads(made_of.read_text())["inputs"]["options"])
    assert [options["gradients"] for options in keys["captures"]] == [True]
    plain = {options["mode"]: options for options in keys["solves"]}["cnt-s"]
    assert not {"direction", "scale", "stable_gamma", "alpha", "rslora"} & set(plain)
    runner.cached_capture(tiny["llama"], calibration, targets="v_proj", seq_len=32, cache_dir=cache_dir)
    without = [json.loads(p.read_text())["inputs"]["options"] for p in cache_dir.glob("captures/*.json")]
    assert sum("gradients" not in options for options in without) == 1


def test_lora_ga_random_direction_takes_one_random_half_of_2r_for_both_factors(tiny, calibration, tmp_path):
    """`--direction random` (PEFT: `torch.randperm(2r)[:r]`, from the global generator): A's rows and B's
    columns are the same r of the 2r leading singular triplets, drawn per module from --seed and its name."""
    store = Store(capture(tiny["llama"], calibration, tmp_path / "g", targets="q_proj,up_proj", gradients=True, accumulate="float64"))
    solved = Solution(solve(store.path, tmp_path / "r", mode="lora-ga", rank=4, direction="random", scale="unit"))
    again = Solution(solve(store.path, tmp_path / "r2", mode="lora-ga", rank=4, direction="random", scale="unit"))
    for name, (b, a) in solved.factors().items():
        grad = store.gradient(name).double() / store.manifest["gradients"]["batches"]
        u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        rows = (a.double() @ vh[:8].T).abs()  # each row of A is ± one of the first 2r right singular vectors
        picked = rows.argmax(dim=1)
        assert torch.allclose(rows.max(dim=1).values, torch.ones(4, dtype=torch.float64), atol=1e-6) and len(set(picked.tolist())) == 4
        expected = u[:, picked] * s[picked]
        assert torch.allclose((b.double().abs() - expected.abs()).abs().max(), torch.zeros((), dtype=torch.float64), atol=1e-6)
        assert torch.equal(b, again.factors()[name][0])  # the same draw from the same seed


def test_samples_with_nothing_to_predict_are_counted_and_never_predict_an_end_token(tiny, tmp_path, capsys):
    """--gradients where samples have no token to predict took them without a word: a prompt that fills
    --seq-len even had the end token truncation appends predicted as if it were the completion's, and a
    --seq-len too short for the tokenizer's special tokens was not applied at all."""
    long_prompt = {"prompt": "Let there be light and there was light over the face of the deep", "completion": " and it was good"}
    data = _jsonl(tmp_path / "mixed.jsonl", [long_prompt, long_prompt, {"text": "And God saw the light, that it was good."}])
    store = Store(capture(tiny["llama"], data, tmp_path / "g", targets="v_proj", seq_len=6, gradients=True))
    expected = len(transformers.AutoTokenizer.from_pretrained(tiny["llama"])("And God saw the light, that it was good.",
                                                                              truncation=True, max_length=6)["input_ids"]) - 1
    assert store.manifest["gradients"]["tokens"] == expected  # the text's next tokens alone
    assert "2 of 3 samples have no token to predict (a single token, or a prompt that fills --seq-len 6): they add statistics " \
           "but no gradient" in capsys.readouterr().err
    prompts = _jsonl(tmp_path / "prompts.jsonl", [long_prompt] * 3)
    assert_refused(capsys, ["capture", tiny["llama"], "--data", prompts, "--seq-len", "6", "--gradients", "-q"],
                   "has a token to predict (each is a single token, or its prompt fills --seq-len 6): give longer text or a larger --seq-len",
                   tmp_path / "h")
    assert_refused(capsys, ["capture", tiny["llama"], "--data", data, "--seq-len", "2"],
                   "--seq-len 2 leaves no room beside the 2 special tokens this tokenizer adds: give at least 3", tmp_path / "i")


def test_lora_ga_niter_is_peft_s_randomized_svd_on_the_same_draw(tiny, tmp_path, monkeypatch):
    """`--niter 4` is the exact path (equal to PEFT's lora_ga with an exact SVD: test_lora_ga_equals_peft) with
    the SVD replaced by PEFT's own randomized one — torch.svd_lowrank(G, q=min(4r, min(G.shape)), niter=4) —
    on each module's Gaussian draw; so it is PEFT's lora_ga_init given the same draw. It stays within 1% of the
    exact factors on these gradients."""
    from cntinit.solve.linalg import sign_of_largest
    from cntinit.solve.modes import gradient
    store = capture(tiny["llama"], _jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS]), tmp_path / "g", targets=TARGETS,
                    batch_size=4, gradients=True, accumulate="float64")
    fast = Solution(solve(store, tmp_path / "fast", mode="lora-ga", rank=2, niter=4, precision="float64"))
    exact = Solution(solve(store, tmp_path / "exact", mode="lora-ga", rank=2, precision="float64"))
    assert fast.manifest["params"]["niter"] == 4

    def peft_svd(grad, count, niter=None, generators=None):  # each module's draw, from its generator's seed, through torch itself
        out = []
        for matrix, made in zip(grad, generators):
            torch.manual_seed(made.initial_seed())
            u, s, v = torch.svd_lowrank(matrix, q=min(2 * count, *matrix.shape), niter=4)
            sign = sign_of_largest(u[:, :count], dim=-2)
            out.append((u[:, :count] * sign, s, v[:, :count].T * sign.unsqueeze(-1)))
        return tuple(torch.stack(parts) for parts in zip(*out))

    monkeypatch.setattr(gradient, "components", peft_svd)
    swapped = Solution(solve(store, tmp_path / "swapped", mode="lora-ga", rank=2, precision="float64"))
    monkeypatch.undo()
    for name, (b, a) in fast.factors().items():
        sb, sa = swapped.factors()[name]
        torch.testing.assert_close(b @ a, sb @ sa, rtol=1e-9, atol=1e-12)
        eb, ea = exact.factors()[name]
        assert float((b @ a - eb @ ea).norm() / (eb @ ea).norm()) < 1e-2, name  # 1.4e-3 at worst here (down_proj)


def test_gradients_only_sums_the_same_gradients_without_statistics(tiny, calibration, tmp_path, capsys):
    """--gradients-only: the gradients (and counts) of --gradients, bit for bit, whole or block by block
    and merged from shards; no Σ in its files; lora-ga from it equals lora-ga from the full store (its
    report without the output change, which needs Σ); the modes that read Σ, and merging it with a
    store that has them, are refused."""
    from safetensors import safe_open

    options = dict(targets="q_proj,v_proj,down_proj", batch_size=4, max_samples=24, accumulate="float64")
    full = Store(capture(tiny["llama"], calibration, tmp_path / "full", gradients=True, **options))
    alone = Store(capture(tiny["llama"], calibration, tmp_path / "alone", gradients_only=True, **options))
    blocks = Store(capture(tiny["llama"], calibration, tmp_path / "blocks", gradients_only=True, layerwise=True, **options))
    assert alone.manifest["capture"]["statistics"] is False and "statistics" not in full.manifest["capture"]
    assert alone.manifest["gradients"] == full.manifest["gradients"] and alone.manifest["stats"].keys() == full.manifest["stats"].keys()
    for key, entry in full.manifest["stats"].items():
        assert alone.manifest["stats"][key]["count"] == entry["count"] == blocks.manifest["stats"][key]["count"]
    for name in full.manifest["modules"]:
        assert torch.equal(alone.gradient(name), full.gradient(name)), name
        assert _close(blocks.gradient(name), full.gradient(name).double(), 1e-6), name
    for file in alone.manifest["files"]:
        with safe_open(alone.path / file, framework="pt") as handle:
            assert all(key.endswith(".grad") for key in handle.keys())
    with pytest.raises(Exception, match="holds loss gradients only"):
        alone.tensors(alone.keys[0])
    one = Solution(solve(alone.path, tmp_path / "ga-alone", mode="lora-ga", rank=2))
    two = Solution(solve(full.path, tmp_path / "ga-full", mode="lora-ga", rank=2))
    for name, (b, a) in two.factors().items():
        assert torch.equal(one.factors()[name][0], b) and torch.equal(one.factors()[name][1], a), name
    rows = json.loads((tmp_path / "ga-alone" / "report.json").read_text())["modules"]
    assert all(row["output_change"] is None for row in rows.values())
    code, out, _ = run(capsys, "inspect", alone.path)
    assert code == 0 and "statistics  none (--gradients-only)" in out
    assert_refused(capsys, ["solve", alone.path, "--mode", "cnt-s"], "holds loss gradients only (--gradients-only): capture again "
                   "without --gradients-only", tmp_path / "refused")
    shard_options = dict(options, batch_size=1)
    parts = [capture(tiny["llama"], calibration, tmp_path / f"s{i}", shard=f"{i}/2", gradients_only=True, **shard_options) for i in range(2)]
    whole = Store(capture(tiny["llama"], calibration, tmp_path / "whole", gradients_only=True, **shard_options))
    merged = Store(merge(parts, tmp_path / "merged"))
    counts = [{key: entry["count"] for key, entry in store.manifest["stats"].items()} for store in (merged, whole)]
    assert counts[0] == counts[1] and merged.manifest["gradients"]["batches"] == whole.manifest["gradients"]["batches"]
    for name in whole.manifest["modules"]:
        assert _close(merged.gradient(name), whole.gradient(name).double(), 1e-6), name
    other = capture(tiny["llama"], calibration, tmp_path / "other", shard="1/2", gradients=True, **shard_options)
    with pytest.raises(Exception, match="holds gradients only"):
        merge([parts[0], other], tmp_path / "mixed")
