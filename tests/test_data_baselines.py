"""EVA and CorDA from a capture, against PEFT's own get_eva_state_dict / preprocess_corda on the same data."""

import json

import peft
import pytest
import torch
import transformers
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda
from peft.tuners.lora.eva import get_eva_state_dict

from cntinit import capture, merge
from cntinit.errors import CntinitError
from cntinit.export import check_peft, export
from cntinit.solve import Options, solve
from conftest import assert_refused
from test_export import assert_modules_add_exactly_ba, factors, linear_weight, load


def _texts(calibration):
    return [json.loads(line)["text"] for line in calibration.read_text().splitlines()]


def test_eva_agrees_with_peft_get_eva_state_dict(tiny, calibration, tmp_path):
    """Same model and data: EVA's rank redistribution and its components (A, up to sign) match PEFT's.

    PEFT runs incremental PCA on centered inputs, so cntinit solves with --centered. One batch
    of all samples and r·ρ·2 ≥ d make PEFT's low-rank incremental PCA exact (no documented
    randomness left), so the comparison is tight.
    """
    targets = ["q_proj", "o_proj"]  # every input distinct: PEFT breaks ties between shared inputs arbitrarily
    stats = capture(tiny["llama"], calibration, tmp_path / "c", targets=",".join(targets))
    solve(stats, tmp_path / "s", Options(mode="eva", rank=16, centered=True))
    ours = factors(tmp_path / "s")

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    batch = dict(tokenizer(_texts(calibration), padding=True, return_tensors="pt"))
    config = peft.LoraConfig(r=16, target_modules=targets, init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
    theirs = get_eva_state_dict(load(tiny["llama"]), [batch], config, show_progress_bar=False)

    assert {n: b.shape[1] for n, (b, _) in ours.items()} == {n: a.shape[0] for n, a in theirs.items() if a.shape[0]}
    assert len({b.shape[1] for b, _ in ours.values()}) > 1  # ranks really were redistributed
    for name, (b, a) in ours.items():
        assert not b.any()
        peft_a = theirs[name].double()
        signs = torch.sign((a * peft_a).sum(1, keepdim=True))
        torch.testing.assert_close(a, signs * peft_a, atol=2e-5, rtol=0)  # measured 3.5e-6: PEFT in float32


def test_eva_with_fixed_ranks_gives_modules_of_one_input_the_same_components(captured, tmp_path):
    """ρ = 1: every module gets rank r; query/key/value read one input, so their A are equal (and saved apart)."""
    solve(captured["bert"], tmp_path / "s", Options(mode="eva", rank=4, rho=1.0))
    solved = factors(tmp_path / "s")
    assert {b.shape[1] for b, _ in solved.values()} == {4}
    layer = "encoder.layer.0.attention.self."
    torch.testing.assert_close(solved[layer + "query"][1], solved[layer + "value"][1], rtol=0, atol=0)


def test_eva_export_keeps_unit_components_and_starts_at_the_pretrained_model(tiny, captured, tmp_path):
    solve(captured["bert"], tmp_path / "s", Options(mode="eva", rank=4, rho=1.5))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["init"] == "offset" and manifest["params"]["rho"] == 1.5
    assert max(e["rank"] for e in manifest["modules"].values()) <= 6  # round(4 · 1.5)
    export(tmp_path / "s", tmp_path / "e", alpha=16)  # scale 4 must not be folded into A
    wrapped = peft.PeftModel.from_pretrained(load(tiny["bert"]), tmp_path / "e")
    adapted = dict(wrapped.base_model.model.named_modules())
    for name, (_, a) in factors(tmp_path / "s").items():
        exported = adapted[name].lora_A["default"].weight.detach().double()
        torch.testing.assert_close(exported, a)
        torch.testing.assert_close(exported @ exported.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    assert check_peft(tmp_path / "e", tmp_path / "s") < 1e-6


@pytest.mark.parametrize("corda_mode", ["ipm", "kpm"])
def test_corda_agrees_with_peft_preprocess_corda(corda_mode, tiny, calibration, tmp_path):
    """PEFT's CorDA scales each sample by |max entry| before summing; capture --sample-max-norm does the same,
    and then s·BA and the residual base equal PEFT's."""
    targets = ["q_proj", "v_proj", "down_proj"]
    stats = capture(tiny["llama"], calibration, tmp_path / "c", targets=",".join(targets), sample_max_norm=True)
    solve(stats, tmp_path / "s", Options(mode="corda", rank=4, corda_mode=corda_mode))
    export(tmp_path / "s", tmp_path / "e")
    ours = factors(tmp_path / "s")
    base = dict(load(tmp_path / "e" / "base").named_modules())

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    model = load(tiny["llama"])

    def run_model():
        for text in _texts(calibration):
            model(**tokenizer(text, return_tensors="pt"))  # one sample per forward, as PEFT's CorDA expects

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=corda_mode))
    preprocess_corda(model, config, run_model=run_model)
    reference = peft.get_peft_model(model, config)
    theirs = dict(reference.base_model.model.named_modules())
    for name, (b, a) in ours.items():
        layer = theirs[name]
        peft_update = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().double()
        torch.testing.assert_close(b @ a, peft_update, rtol=0, atol=5e-4 * float(peft_update.abs().max()))  # PEFT works in float32: kpm differs by 1.8e-4 of the max
        torch.testing.assert_close(linear_weight(base[name]), linear_weight(layer.get_base_layer()), rtol=0, atol=2e-6)


def test_corda_residual_export_starts_at_the_pretrained_model(tiny, captured, tmp_path):
    solve(captured["gpt2"], tmp_path / "s", Options(mode="corda", rank=3, vas=True))
    export(tmp_path / "s", tmp_path / "e", alpha=12)
    wrapped = peft.PeftModel.from_pretrained(load(tmp_path / "e" / "base"), tmp_path / "e")
    assert_modules_add_exactly_ba(wrapped, load(tiny["gpt2"]), factors(tmp_path / "s"), residual=True)


def test_sample_max_norm_divides_each_sample_by_its_peak(tiny, tmp_path):
    """Σxxᵀ with --sample-max-norm equals the sum over samples of (X/|max X|)ᵀ(X/|max X|), whatever the batching."""
    texts = ["Let there be light.", "And the evening and the morning were the first day.", "Waters."]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    batched = capture(tiny["llama"], tmp_path / "d.jsonl", tmp_path / "c", targets="o_proj", sample_max_norm=True, batch_size=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny["llama"])
    model = load(tiny["llama"])
    module = model.model.layers[0].self_attn.o_proj
    want = torch.zeros(64, 64, dtype=torch.float64)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].double()))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    handle.remove()
    for x in seen:
        x = x / x.max().abs()
        want += x.T @ x
    from cntinit.storage.store import Store
    got = Store(batched).tensors("model.layers.0.self_attn.o_proj")["xxt"].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = capture(tiny["llama"], tmp_path / "d.jsonl", tmp_path / "p", targets="o_proj")
    with pytest.raises(CntinitError, match="--sample-max-norm"):
        merge([batched, plain], tmp_path / "m")


def test_eva_and_corda_errors(tiny, captured, tmp_path, capsys):
    for args, message in [
        (["--model", tiny["llama"], "-m", "eva"], "--mode eva needs activation statistics"),
        ([captured["llama"], "-m", "eva", "--vas"], "eva redistributes ranks itself"),
        ([captured["llama"], "-m", "eva", "--rho", "0.5"], "--rho must be at least 1"),
        ([captured["llama"], "-m", "eva", "--init", "residual"], "nothing to subtract"),
        ([captured["llama"], "-m", "corda", "--init", "offset"], "use --init residual"),
        ([captured["llama"], "-m", "corda", "--corda-mode", "abc"], "--corda-mode abc is not one of ipm, kpm"),
        ([captured["llama"], "-m", "cnt-s", "--corda-mode", "kpm"], "--corda-mode applies to --mode corda"),
        ([captured["llama"], "-m", "corda", "--decompose", "qr"], "splits W by svd"),
    ]:
        assert_refused(capsys, ("solve", *args), message, tmp_path / "s")


def test_cpu_batches_of_weights_stay_small_enough_for_the_heap_to_reuse(captured, monkeypatch):
    """On the CPU a batch of W stays within CPU_BATCH_BYTES (below glibc's mmap threshold, a freed batch's memory
    serves the next: a fresh mapping page-faults every page) — the weight modes' batches and the CNT modes' alike; on an
    accelerator the memory budget alone sets it."""
    import functools
    from dataclasses import replace

    from cntinit.models import pretrained
    from cntinit.models.linears import in_out_features
    from cntinit.solve import inputs, options
    from cntinit.solve.modes.registry import MODES
    from cntinit.storage.store import Store

    stats = Store(captured["llama"])
    modules = pretrained.open_recorded(stats.manifest, None, False).modules
    chosen = options.Options(mode="pissa", rank=2).resolved()
    d, k = in_out_features(next(iter(modules.values())))
    budget = 2 * k * d * 8  # two float64 matrices of the first shape
    cnt = options.Options(mode="cnt-x", rank=2).resolved()
    cnt = replace(cnt, bucket_weights=inputs.bucket_weights(cnt, stats.buckets))
    for made in (functools.partial(inputs.weights, stats, modules, chosen), functools.partial(MODES.named("cnt-x").batches, stats, modules, cnt)):
        batches = {}
        for bound in (budget, 1 << 40):
            monkeypatch.setattr(inputs, "CPU_BATCH_BYTES", bound)
            batches[bound] = [(len(b.names), b.weight.numel() * 8) for b in made(torch.device("cpu"), torch.float64)]
        assert all(size <= budget or count == 1 for count, size in batches[budget]) and max(size for _, size in batches[1 << 40]) > budget
        assert sum(count for count, _ in batches[budget]) == sum(count for count, _ in batches[1 << 40]) == len(modules)
    monkeypatch.setattr(inputs, "CPU_BATCH_BYTES", budget)
    assert inputs.batch_size(k, d, 0, torch.device("meta"), torch.float64) > inputs.batch_size(k, d, 0, torch.device("cpu"), torch.float64) == 2


def test_corda_batches_count_their_square_matrices_and_give_the_same_factors(captured, tmp_path, monkeypatch):
    """A batch's memory budget counts each module's d × d matrices (Σ, and CorDA's C, C⁻¹ and their
    temporaries): CorDA's batches hold fewer modules than the weight-only ones, and the factors do not
    depend on how the modules are batched (one per batch here)."""
    from cntinit.models import pretrained
    from cntinit.models.linears import in_out_features
    from cntinit.solve import inputs, options
    from cntinit.solve.modes.data_baselines import corda_metric
    from cntinit.storage.store import Store

    stats = Store(captured["llama"])
    modules = pretrained.open_recorded(stats.manifest, None, False).modules
    chosen = options.Options(mode="corda", rank=2).resolved()
    d, k = in_out_features(next(iter(modules.values())))
    monkeypatch.setattr(inputs, "CHUNK_BYTES", (6 * k * d + 8 * d * d) * 8 * 2)  # two CorDA modules, or more without Σ
    sizes = {name: [len(b.names) for b in inputs.weights(stats, modules, chosen, torch.device("cpu"), torch.float64, metric)]
             for name, metric in (("corda", corda_metric), ("weights", None))}
    assert max(sizes["corda"]) == 2 < max(sizes["weights"])
    whole = solve(captured["llama"], tmp_path / "whole", Options(mode="corda", rank=2))
    monkeypatch.setattr(inputs, "CHUNK_BYTES", 1)
    one = solve(captured["llama"], tmp_path / "one", Options(mode="corda", rank=2))
    for name, (b, a) in factors(whole).items():
        got_b, got_a = factors(one)[name]
        torch.testing.assert_close(got_b @ got_a, b @ a, rtol=1e-5, atol=1e-6)
