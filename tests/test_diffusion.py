"""Stable-Diffusion-style pipelines: capture from images and prompts, export kohya and diffusers
files, and load them with diffusers' own `load_lora_weights`."""

import json
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cntinit import capture, export, solve
from cntinit.storage import store
from conftest import assert_refused, run
from imaging import build_sd, build_sdxl, write_images
from test_export import factors

TARGETS = "to_q,to_k,to_v,to_out.0,q_proj,k_proj,v_proj,out_proj"


def captured_pipeline(tmp_path_factory, build):
    """A tiny pipeline from `build`, five captioned images, and their capture."""
    root = tmp_path_factory.mktemp(build.__name__)
    model, images = build(root / "model"), write_images(root / "images", count=5)
    return {"model": model, "images": images, "stats": capture(model, images, root / "stats", targets=TARGETS, batch_size=2)}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return captured_pipeline(tmp_path_factory, build_sd)


def load_pipeline(path, sdxl: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if sdxl:
            return diffusers.StableDiffusionXLPipeline.from_pretrained(path)
        return diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


def pixels_of(folder, size=16):
    """Shorter side to `size`, center crop, [−1, 1]: how the pipelines prepare training images."""
    out = []
    for path in sorted((p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".webp")), key=lambda p: p.relative_to(folder).as_posix()):
        image = Image.open(path).convert("RGB")
        scale = size / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        array = torch.tensor(np.asarray(image.crop((left, top, left + size, top + size))), dtype=torch.float32)
        out.append(array.permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


def captions_of(folder):
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [r["text"] for r in sorted(records, key=lambda r: r["file_name"])]


def summing_linear_inputs(pipe, parts) -> dict:
    """Hooks that add Σxxᵀ of every Linear's input in `parts` (float64) to the returned dict, by cntinit's names."""
    sums = {}
    for part in parts:
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, torch.nn.Linear):
                def record(module, args, name=f"{part}.{name}"):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    sums[name] = sums.get(name, 0) + x.T @ x
                module.register_forward_pre_hook(record)
    return sums


@pytest.mark.parametrize("noise_timestep", [None, 400])
def test_statistics_match_an_independent_pipeline_forward(sd, tmp_path, noise_timestep):
    stats = capture(sd["model"], sd["images"], tmp_path / "stats", targets=TARGETS, batch_size=8, noise_timestep=noise_timestep, seed=3)
    pipe = load_pipeline(sd["model"])
    sums = summing_linear_inputs(pipe, ("unet", "text_encoder"))
    with torch.no_grad():
        ids = pipe.tokenizer(captions_of(sd["images"]), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        states = pipe.text_encoder(ids)[0]
        latents = pipe.vae.encode(pixels_of(sd["images"])).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.full((latents.shape[0],), noise_timestep or 0)
        if noise_timestep is not None:
            latents = pipe.scheduler.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)), t)
        pipe.unet(latents, t, encoder_hidden_states=states)
    opened = store.Store(stats)
    names = list(opened.manifest["modules"])
    assert len(names) == 40 and {n.split(".")[0] for n in names} == {"unet", "text_encoder"}
    assert not any("vae" in n for n in names)
    cross = next(n for n in names if n.endswith("attn2.to_k"))
    assert opened.manifest["stats"][opened.manifest["modules"][cross]["key"]]["count"] == 5 * 16  # text tokens, padding included
    for name, entry in opened.manifest["modules"].items():
        got = opened.tensors(entry["key"])["xxt"].double()
        torch.testing.assert_close(got, sums[name], rtol=1e-4, atol=1e-4 * float(sums[name].abs().max()))


def test_noise_timestep_changes_only_the_unet_and_is_seeded(sd, tmp_path):
    one = store.Store(capture(sd["model"], sd["images"], tmp_path / "a", targets=TARGETS, noise_timestep=500, seed=1))
    again = store.Store(capture(sd["model"], sd["images"], tmp_path / "b", targets=TARGETS, noise_timestep=500, seed=1))
    clean = store.Store(sd["stats"])
    for name, entry in clean.manifest["modules"].items():
        key = entry["key"]
        torch.testing.assert_close(one.tensors(key)["xxt"], again.tensors(key)["xxt"])
        same = torch.allclose(one.tensors(key)["xxt"], clean.tensors(key)["xxt"], rtol=1e-4, atol=1e-4)
        assert same == (name.startswith("text_encoder") or name.endswith(("attn2.to_k", "attn2.to_v"))), name


def predicting(model, prediction: str, directory):
    """A copy of the pipeline at `model` whose scheduler config says the UNet predicts `prediction`."""
    shutil.copytree(model, directory)
    config = directory / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": prediction}))
    return directory


@pytest.mark.parametrize("prediction,timestep", [("epsilon", None), ("v_prediction", None), ("epsilon", 400)])
def test_gradients_are_of_the_denoising_loss_training_computes(sd, tmp_path, prediction, timestep):
    """capture --gradients on a pipeline: each target's gradient of diffusers' training loss — latents noised by a
    DDPMScheduler at uniform random timesteps (or --noise-timestep's), MSE of the UNet's prediction against the noise
    (epsilon) or the velocity (v_prediction) — computed here by autograd on the pipeline diffusers loads, same seed."""
    model = predicting(sd["model"], prediction, tmp_path / "model")
    stats = store.Store(capture(model, sd["images"], tmp_path / "stats", targets=TARGETS, batch_size=8, gradients=True, seed=3,
                                noise_timestep=timestep))
    pipe = load_pipeline(model)
    schedule = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    ids = pipe.tokenizer(captions_of(sd["images"]), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        latents = pipe.vae.encode(pixels_of(sd["images"])).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.randint(0, schedule.config.num_train_timesteps, (latents.shape[0],), generator=generator) if timestep is None \
        else torch.full((latents.shape[0],), timestep)
    noise = torch.randn(latents.shape, generator=generator)
    prediction_ = pipe.unet(schedule.add_noise(latents, noise, t), t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
    target = noise if prediction == "epsilon" else schedule.get_velocity(latents, noise, t)
    loss = torch.nn.functional.mse_loss(prediction_, target)
    names = list(stats.manifest["modules"])
    weights = [getattr(pipe, name.split(".")[0]).get_submodule(name.split(".", 1)[1]).weight for name in names]
    expected = torch.autograd.grad(loss, weights)
    gradients = stats.manifest["gradients"]
    assert gradients["batches"] == 1 and gradients["tokens"] == latents.numel()
    assert gradients["mean_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}  # the text encoder's gradient comes through cross-attention
    for name, want in zip(names, expected):
        got = stats.gradient(name).double()
        torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_lora_ga_of_a_pipeline_exports_and_loads_in_diffusers(sd, tmp_path, capsys):
    """The gradient inits reach the pipeline formats: lora-ga's residual base and adapter load in diffusers, starting at
    the pretrained pipeline; a pipeline refuses --gradient-checkpointing (no chain of blocks)."""
    stats = capture(sd["model"], sd["images"], tmp_path / "stats", targets=TARGETS, batch_size=2, gradients=True)
    code, _, err = run(capsys, "solve", stats, "-m", "lora-ga", "-r", "4", "-o", tmp_path / "solve")
    assert code == 0, err
    code, _, err = run(capsys, "export", tmp_path / "solve", "--format", "diffusers", "--check", "-o", tmp_path / "e")
    assert code == 0 and "check: diffusers loads" in err, err
    pipe = load_pipeline(tmp_path / "e" / "base")
    pipe.load_lora_weights(str(tmp_path / "e"))
    assert_pipeline_computes(pipe, load_pipeline(sd["model"]), factors(tmp_path / "solve"), residual=True)
    assert_refused(capsys, ["capture", sd["model"], "--data", sd["images"], "--gradients", "--gradient-checkpointing"],
                   "a diffusers pipeline's UNet is not one", tmp_path / "bad")
    code, _, err = run(capsys, "solve", stats, "-m", "lora-ga", "-r", "4", "--alpha", "16", "-o", tmp_path / "solve16")
    assert code == 0, err
    assert_refused(capsys, ["export", tmp_path / "solve16", "--format", "diffusers"],
                   "diffusers loads its files at scale 1: export with --format kohya (which carries α)", tmp_path / "bad")
    code, _, err = run(capsys, "export", tmp_path / "solve16", "--format", "kohya", "--check", "-o", tmp_path / "k")
    assert code == 0 and "check: diffusers loads" in err, err
    flow = predicting(sd["model"], "flow", tmp_path / "flow")
    assert_refused(capsys, ["capture", flow, "--data", sd["images"], "--gradients"], "this pipeline's scheduler predicts 'flow'",
                   tmp_path / "bad")


def test_mica_to_a_pipeline_format_says_b_must_be_frozen_by_the_trainer(sd, tmp_path, capsys):
    """kohya and diffusers files cannot mark MiCA's B frozen (PEFT's adapter_config can): the export warns, and what it
    writes loads in diffusers as the pretrained pipeline (A = 0)."""
    solved = solve(sd["stats"], tmp_path / "solve", mode="mica", rank=2)
    code, _, err = run(capsys, "export", solved, "--format", "kohya", "--check", "-o", tmp_path / "k")
    assert code == 0 and "MiCA trains A only, under a frozen B, and the kohya format cannot say so: freeze the lora_up" in err, err
    assert "check: diffusers loads" in err


def adapted_modules(pipe):
    return {f"{part}.{n}": m for part in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, part, None) is not None
            for n, m in getattr(pipe, part).named_modules()}


def assert_pipeline_computes(pipe, pretrained, solved, residual):
    """Every adapted module of `pipe` computes (W + BA) x, or W x when `residual`."""
    adapted, original = adapted_modules(pipe), adapted_modules(pretrained)
    generator = torch.Generator().manual_seed(0)
    for name, (b, a) in solved.items():
        w = original[name].weight.detach().double()
        x = torch.randn(3, w.shape[1], generator=generator, dtype=torch.float64)
        bias = original[name].bias.detach().double() if original[name].bias is not None else 0
        want = x @ (w if residual else w + b @ a).T + bias
        with torch.no_grad():
            got = adapted[name](x.float()).double()
        scale = (x.norm(dim=1, keepdim=True) * (w.norm() + (b @ a).norm())).max()
        assert (got - want).abs().max() <= 2e-6 * scale, (name, float((got - want).abs().max() / scale))


@pytest.mark.parametrize("format, mode, vas", [("diffusers", "cnt-x", True), ("kohya", "cnt-s", False),
                                               ("diffusers", "pissa", False), ("kohya", "corda", True)])
def test_export_loads_with_load_lora_weights(sd, tmp_path, format, mode, vas):
    solved = solve(sd["stats"], tmp_path / "solve", mode=mode, rank=4, vas=vas)
    # kohya with variable ranks: one alpha for all (diffusers 0.42 ignores per-module kohya alphas; see below)
    out = export(solved, tmp_path / "out", format=format, alpha=None if format == "diffusers" else 8, fixed_alpha=format == "kohya")
    exported = json.loads((out / "manifest.json").read_text())
    residual = exported["init"] == "residual"
    ranks = {n: e["rank"] for n, e in json.loads((solved / "manifest.json").read_text())["modules"].items() if e["rank"]}
    assert (len(set(ranks.values())) > 1) == vas
    pretrained = load_pipeline(sd["model"])
    file = out / exported["adapter_file"]
    with safe_open(file, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    if format == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in keys
        assert "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in keys
        assert metadata["ss_network_dim"] == ("Dynamic" if vas else "4") and metadata["ss_network_alpha"] == "8.0"
        assert exported["residual_base"] is None  # kohya merges the residual itself
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        assert (exported["residual_base"] is not None) == residual
    base = out / "base" if exported["residual_base"] else sd["model"]
    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(out), weight_name=exported["adapter_file"])
    assert_pipeline_computes(pipe, pretrained, factors(solved), residual=residual and format == "diffusers")
    if format == "kohya" and residual:
        # the printed recipe: --base_weights FILE --base_weights_multiplier -1 merges W − BA, then the
        # same file as --network_weights adds BA back: the initial model is the pretrained one
        merged = load_pipeline(sd["model"])
        merged.load_lora_weights(str(out), weight_name=exported["adapter_file"], adapter_name="base")
        merged.set_adapters(["base"], adapter_weights=[-1.0])
        merged.fuse_lora(adapter_names=["base"])
        merged.unload_lora_weights()
        merged.load_lora_weights(str(out), weight_name=exported["adapter_file"], adapter_name="network")
        assert_pipeline_computes(merged, pretrained, factors(solved), residual=True)


def test_check_measures_the_files_not_float32_cancellation(sd, tmp_path):
    """A residual cnt-x here has B@A up to 2,000× W: in float32 the written base and B@A cancel to
    4e-4, and `--check` failed an export whose files were exact to 6e-13. It computes in float64."""
    solved = solve(sd["stats"], tmp_path / "solve", mode="cnt-x", rank=4, init="residual")
    out = export(solved, tmp_path / "out", format="diffusers", check=True)
    assert json.loads((out / "manifest.json").read_text())["check"]["max_relative_error"] < 1e-10


def test_kohya_dynamic_alphas_add_exactly_ba_as_sd_scripts_computes(sd, tmp_path):
    """sd-scripts applies up @ down · alpha / dim per module; with variable ranks the default keeps
    alpha / dim constant, so alphas vary ("Dynamic") and each module still adds exactly BA."""
    solved = solve(sd["stats"], tmp_path / "solve", mode="cnt-x", rank=4, vas=True)
    out = export(solved, tmp_path / "out", format="kohya", alpha=8)
    with safe_open(out / "lora.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    for name, (b, a) in factors(solved).items():
        component = "unet." if name.startswith("unet.") else "text_encoder."
        path = name.removeprefix(component)
        key = ("lora_unet_" if component == "unet." else "lora_te_text_model_") + path.replace(".", "_")
        down, up, alpha = tensors[f"{key}.lora_down.weight"].double(), tensors[f"{key}.lora_up.weight"].double(), float(tensors[f"{key}.alpha"])
        assert alpha / down.shape[0] == pytest.approx(8 / 4)  # the scale α/r of the solve's base rank, for every rank
        torch.testing.assert_close(up @ down * alpha / down.shape[0], b @ a, rtol=1e-5, atol=1e-6 * float((b @ a).abs().max()))
    code_error = None
    try:
        from cntinit.export import check_pipeline
        check_pipeline(out, solved)
    except Exception as exc:  # noqa: BLE001 - the message is what matters
        code_error = str(exc)
    assert code_error and "--fixed-alpha" in code_error


def test_export_check_uses_diffusers(sd, tmp_path, capsys):
    solved = solve(sd["stats"], tmp_path / "solve", mode="cnt-x", rank=4)
    code, out, err = run(capsys, "export", solved, "--format", "kohya", "--alpha", "16", "--check", "-o", tmp_path / "k")
    assert code == 0 and "check: diffusers loads" in err, err
    assert f"--network_module networks.lora --network_weights {tmp_path / 'k' / 'lora.safetensors'} --dim_from_weights" in err


def test_pipeline_errors(sd, captured, tmp_path, capsys):
    solved = solve(sd["stats"], tmp_path / "solve", mode="cnt-x", rank=4)
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--format", "peft"], "export it with --format diffusers or --format kohya", tmp_path / "a")
    assert_refused(capsys, ["export", solved, "--format", "diffusers", "--alpha", "8"], "--alpha does not apply to --format diffusers", tmp_path / "b")
    assert_refused(capsys, ["export", solved, "--format", "kohya", "--dora"], "--dora does not apply to --format kohya", tmp_path / "c")
    text_solve = solve(captured["llama"], tmp_path / "text-solve", mode="cnt-x", rank=4)
    capsys.readouterr()
    assert_refused(capsys, ["export", text_solve, "--format", "kohya"], "--format kohya is for diffusion pipelines", tmp_path / "d")
    uncaptioned = write_images(tmp_path / "plain", count=2, captions=False)
    assert_refused(capsys, ["capture", sd["model"], "--data", uncaptioned], "has no caption", tmp_path / "e")
    assert_refused(capsys, ["capture", sd["model"], "--data", sd["images"], "--noise-timestep", "1000"],
                   "--noise-timestep must be in [0, 1000)", tmp_path / "f")
    assert_refused(capsys, ["capture", sd["model"], "--data", sd["images"], "--sample-max-norm"],
                   "--sample-max-norm does not apply to a diffusion model", tmp_path / "g")
    assert_refused(capsys, ["capture", sd["model"], "--data", sd["images"], "--offload"],
                   "--offload places transformers models; ", tmp_path / "i")
    assert not list(tmp_path.glob(".i.offload-*"))  # its disk folder went with the error
    code, _, err = run(capsys, "capture", sd["model"], "--data", uncaptioned, "--prompt", "a photo of sks dog", "-o", tmp_path / "h")
    assert code == 0, err
    assert_refused(capsys, ["capture", sd["model"], "--data", sd["images"], "--gradients", "--seed", str(2**70)],  # was a traceback
                   f"--seed must be an integer from {-2**63} to {2**64 - 1}, got {2**70}", tmp_path / "j")
    timeless = shutil.copytree(sd["model"], tmp_path / "timeless")
    config = json.loads((timeless / "scheduler" / "scheduler_config.json").read_text())
    (timeless / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"num_train_timesteps": 0}))
    assert_refused(capsys, ["capture", timeless, "--data", sd["images"], "--gradients"],  # was a traceback
                   f"{timeless}/scheduler says num_train_timesteps 0: a scheduler trains over at least one timestep", tmp_path / "k")


def test_a_pipeline_part_that_does_not_hold_its_weights_is_refused(sd, tmp_path, capsys):
    """A weight missing from the UNet or the text encoder was left at its random init (diffusers and
    transformers only warn); one stored as float8 codes was cast into the weights; a quantized part
    could not be loaded. Each is refused with the fix, naming the part."""
    def damaged(name, part, change):
        model = tmp_path / name
        shutil.copytree(sd["model"], model)
        file = next((model / part).glob("*.safetensors"))
        tensors = load_file(file)
        change(tensors, model / part)
        save_file(tensors, file, metadata={"format": "pt"})
        return model

    def quantized(tensors, part):
        config = json.loads((part / "config.json").read_text())
        (part / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "bitsandbytes"}}))

    cases = {"unet": ("unet", lambda t, _: t.pop("conv_out.weight"), "unet has no weight for conv_out.weight, which from_pretrained "
                      "would draw at random: the checkpoint is incomplete or another model's; use an intact copy"),
             "text": ("text_encoder", lambda t, _: t.pop("final_layer_norm.weight"), "text_encoder has no weight for "),
             "codes": ("unet", lambda t, _: t.update({"conv_in.weight": t["conv_in.weight"].to(torch.float8_e4m3fn)}),
                       "unet: conv_in.weight is stored as float8_e4m3fn, not as 16-, 32- or 64-bit floats"),
             "quantized": ("unet", quantized, "unet is a quantized checkpoint (bitsandbytes): cntinit reads the unquantized weights")}
    for name, (part, change, message) in cases.items():
        model = damaged(name, part, change)
        assert_refused(capsys, ["capture", model, "--data", sd["images"]], f"{model}/{message}", tmp_path / f"out-{name}")


def test_a_tokenizer_without_a_length_limit_pads_to_the_text_encoders_positions(sd, tmp_path):
    """Without model_max_length the tokenizer reports 1e30 (transformers' "no limit"); padding to it crashed."""
    import shutil

    pipe = shutil.copytree(sd["model"], tmp_path / "pipe")
    config_file = pipe / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("model_max_length")
    config_file.write_text(json.dumps(config))
    stats = store.Store(capture(pipe, sd["images"], tmp_path / "stats", targets="to_k"))
    cross = [entry for name, entry in stats.manifest["stats"].items() if "attn2" in name]
    assert cross and all(entry["count"] == 16 * 5 for entry in cross)  # 5 images × the encoder's 16 positions


def test_unet_only_export_leaves_the_text_encoder_out_and_refuses_a_residual_one(sd, captured, tmp_path, capsys):
    """sd-scripts' --network_train_unet_only drops the text encoder's adapter: an offset init then
    leaves the text encoder as it was (its modules are left out of the file, and diffusers loads the
    rest exactly); a residual init would keep the text encoder's W − BA without its adapter, so it is
    refused unless the UNet was solved alone."""
    offset = solve(sd["stats"], tmp_path / "offset", mode="cnt-x", rank=4)
    code, _, err = run(capsys, "export", offset, "--format", "kohya", "--unet-only", "--fixed-alpha", "--check", "-o", tmp_path / "k")
    assert code == 0 and "left out the 8 text-encoder modules" in err and "--dim_from_weights --network_train_unet_only" in err, err
    with safe_open(tmp_path / "k" / "lora.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    residual = solve(sd["stats"], tmp_path / "residual", mode="cnt-x", rank=4, init="residual")
    capsys.readouterr()
    assert_refused(capsys, ["export", residual, "--format", "kohya", "--unet-only"], "solve the UNet or transformer alone", tmp_path / "r")
    unet = solve(sd["stats"], tmp_path / "unet", mode="pissa", rank=4, targets=r"re:unet\..*")  # residual, the UNet alone
    code, _, err = run(capsys, "export", unet, "--format", "diffusers", "--unet-only", "--check", "-o", tmp_path / "u")
    assert code == 0 and "left out" not in err, err
    text = solve(captured["llama"], tmp_path / "text", mode="cnt-x", rank=4)
    capsys.readouterr()
    assert_refused(capsys, ["export", text, "--unet-only"], "--unet-only is for diffusion pipelines", tmp_path / "p")


def _sd_scripts_names(root, prefix: str, targets: tuple[str, ...], kinds: tuple[str, ...] = ("Linear", "Conv2d")) -> set[str]:
    """sd-scripts' `LoRANetwork.create_modules` naming (networks/lora.py): every Linear/Conv2d (`kinds`) inside
    a module whose class is one of `targets`, named prefix + "." + its path + "." + the child's, dots to underscores."""
    names = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ in targets:
            for child_name, child in module.named_modules():
                if child.__class__.__name__ in kinds:
                    names.add((prefix + "." + name + "." + child_name).replace(".", "_"))
    return names


def test_kohya_keys_are_the_names_sd_scripts_generates(sd, tmp_path):
    """sd-scripts (requirements.txt: transformers 4.54.1, where CLIPTextModel nests its layers under
    `text_model.`) builds the network from the file's keys with --dim_from_weights: the file's modules
    must be exactly among the names it generates — UNet: Linears in Transformer2DModel; text encoder:
    in CLIPAttention/CLIPMLP. Under transformers 5 (no `text_model.` level) it would name the text
    encoder's modules otherwise and load none of them: the export targets sd-scripts as released."""
    all_targets = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,q_proj,k_proj,v_proj,out_proj,fc1,fc2"  # every Linear sd-scripts adapts
    stats = capture(sd["model"], sd["images"], tmp_path / "stats", targets=all_targets, batch_size=2)
    out = export(solve(stats, tmp_path / "solve", mode="cnt-s", rank=2), tmp_path / "k", format="kohya")
    with safe_open(out / "lora.safetensors", "pt") as handle:
        modules = {key.split(".")[0] for key in handle.keys()}
    pipe = load_pipeline(sd["model"])
    linear_unet = _sd_scripts_names(pipe.unet, "lora_unet", ("Transformer2DModel",), ("Linear",))
    text_encoder_5 = _sd_scripts_names(pipe.text_encoder, "lora_te", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))
    text_encoder_4 = {name.replace("lora_te_", "lora_te_text_model_", 1) for name in text_encoder_5}  # transformers 4's nesting
    # sd-scripts also names the 1×1 Conv2d proj_in/proj_out (SD 1.x); cntinit adapts linear layers, and with
    # --dim_from_weights sd-scripts skips the names the file lacks
    assert linear_unet < _sd_scripts_names(pipe.unet, "lora_unet", ("Transformer2DModel",))
    assert {m for m in modules if m.startswith("lora_unet_")} == linear_unet
    assert {m for m in modules if m.startswith("lora_te_")} == text_encoder_4
    assert not modules & text_encoder_5  # what sd-scripts under transformers 5 would look for



def test_kohya_refuses_a_layout_it_has_no_names_for(sd, tmp_path, capsys):
    """A pipeline whose layout kohya.LAYOUTS does not map (here a solve manifest naming one) is refused with
    the way out, not named as SD 1.x's modules are."""
    solved = solve(sd["stats"], tmp_path / "solve", mode="cnt-s", rank=2)
    manifest = json.loads((solved / "manifest.json").read_text())
    manifest["model"]["layout"] = "wan"
    (solved / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--format", "kohya"], "this solve is of a wan pipeline, whose module names sd-scripts' "
                   "format has no map for here: export --format diffusers", tmp_path / "k")
    assert export(solved, tmp_path / "d", format="diffusers").exists()


# ---------------------------------------------------------------- SDXL

@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return captured_pipeline(tmp_path_factory, build_sdxl)


def test_sdxl_statistics_match_the_pipelines_own_conditioning(sdxl, tmp_path):
    """SDXL's UNet reads both encoders' penultimate states side by side, the second encoder's pooled
    projection and the micro-conditioning time ids: here they come from the pipeline's own
    `encode_prompt` and `_get_add_time_ids`, and every statistic must agree."""
    stats = capture(sdxl["model"], sdxl["images"], tmp_path / "stats", targets=TARGETS, batch_size=8, noise_timestep=300, seed=2)
    pipe = load_pipeline(sdxl["model"], sdxl=True)
    sums = summing_linear_inputs(pipe, ("unet", "text_encoder", "text_encoder_2"))
    with torch.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(captions_of(sdxl["images"]), device="cpu", do_classifier_free_guidance=False)
        time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=states.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        latents = pipe.vae.encode(pixels_of(sdxl["images"])).latent_dist.mean * pipe.vae.config.scaling_factor
        t = torch.full((latents.shape[0],), 300)
        latents = pipe.scheduler.add_noise(latents, torch.randn(latents.shape, generator=torch.Generator().manual_seed(2)), t)
        pipe.unet(latents, t, encoder_hidden_states=states,
                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(len(states), 1)})
    opened = store.Store(stats)
    assert opened.manifest["model"]["layout"] == "sdxl"
    names = list(opened.manifest["modules"])
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder", "text_encoder_2"}
    # the second encoder's last layer feeds only the pooled projection, not the UNet's states: it runs, and counts
    assert any(n.startswith("text_encoder_2.") and ".layers.1." in n for n in names)
    for name, entry in opened.manifest["modules"].items():
        got = opened.tensors(entry["key"])["xxt"].double()
        torch.testing.assert_close(got, sums[name], rtol=1e-4, atol=1e-4 * float(sums[name].abs().max()), msg=name)


def test_sdxl_gradients_name_the_layers_the_loss_never_reaches(sdxl, tmp_path, capsys):
    """SDXL's UNet reads the first text encoder's penultimate states, so its last layer gets a zero gradient: lora-one
    would give it A = B = 0, an adapter that never trains; the solve says so and names the way out. The rest get one."""
    stats = store.Store(capture(sdxl["model"], sdxl["images"], tmp_path / "stats", targets=TARGETS, batch_size=2, gradients=True))
    zero = sorted(n for n in stats.manifest["modules"] if not stats.gradient(n).any())
    assert zero and all(n.startswith("text_encoder.") and ".layers.1." in n for n in zero)
    assert any(n.startswith("text_encoder_2.") and ".layers.1." in n and stats.gradient(n).any() for n in stats.manifest["modules"])
    code, _, err = run(capsys, "solve", stats.path, "-m", "lora-one", "-r", "2", "-o", tmp_path / "solve")
    assert code == 0 and f"{len(zero)} modules have a zero loss gradient" in err and "A = B = 0, which never trains" in err, err


def _sd_scripts_sdxl_unet(transformer_blocks: int, width: int = 8) -> torch.nn.Module:
    """The module tree of sd-scripts' `SdxlUNet2DConditionModel` (library/sdxl_original_unet.py) at
    toy widths: input_blocks = conv_in, level 0 ×2 [ResnetBlock2D], Downsample2D, level 1 ×2
    [ResnetBlock2D, Transformer2DModel], Downsample2D, level 2 ×2 [ResnetBlock2D, Transformer2DModel];
    middle_block = [ResnetBlock2D, Transformer2DModel, ResnetBlock2D]; output_blocks = level 2 ×3 and
    level 1 ×3 [ResnetBlock2D, Transformer2DModel(, Upsample2D)], level 0 ×3 [ResnetBlock2D]. A
    Transformer2DModel holds proj_in, transformer_blocks[k] (attn1, attn2: to_q, to_k, to_v,
    to_out[0]; ff.net[0].proj, ff.net[2]) and proj_out, all Linear (use_linear_projection)."""
    def named(cls_name, **children):
        module = type(cls_name, (torch.nn.Module,), {})()
        for key, child in children.items():
            module.add_module(key, child)
        return module

    def linear():
        return torch.nn.Linear(width, width)

    def attention():
        return named("CrossAttention", to_q=linear(), to_k=linear(), to_v=linear(), to_out=torch.nn.ModuleList([linear()]))

    def transformer():
        blocks = [named("BasicTransformerBlock", attn1=attention(), ff=named("FeedForward", net=torch.nn.ModuleList(
            [named("GEGLU", proj=linear()), torch.nn.Dropout(), linear()])), attn2=attention()) for _ in range(transformer_blocks)]
        return named("Transformer2DModel", proj_in=linear(), transformer_blocks=torch.nn.ModuleList(blocks), proj_out=linear())

    def resnet():
        return named("ResnetBlock2D", conv1=torch.nn.Conv2d(width, width, 3))

    def sample(kind):
        return named(kind, conv=torch.nn.Conv2d(width, width, 3))

    inputs = [torch.nn.Sequential(torch.nn.Conv2d(4, width, 3))] + [torch.nn.ModuleList([resnet()]) for _ in range(2)]
    inputs += [torch.nn.Sequential(sample("Downsample2D"))] + [torch.nn.ModuleList([resnet(), transformer()]) for _ in range(2)]
    inputs += [torch.nn.Sequential(sample("Downsample2D"))] + [torch.nn.ModuleList([resnet(), transformer()]) for _ in range(2)]
    outputs = [torch.nn.ModuleList([resnet(), transformer()] + ([sample("Upsample2D")] if i == 2 else [])) for _ in range(2) for i in range(3)]
    outputs += [torch.nn.ModuleList([resnet()]) for _ in range(3)]
    return named("SdxlUNet2DConditionModel", input_blocks=torch.nn.ModuleList(inputs),
                 middle_block=torch.nn.ModuleList([resnet(), transformer(), resnet()]), output_blocks=torch.nn.ModuleList(outputs))


@pytest.mark.parametrize("init", ["offset", "residual"])
def test_sdxl_exports_load_in_diffusers_with_sd_scripts_names(sdxl, tmp_path, init):
    """Both formats load with diffusers' `load_lora_weights` into the right modules (kohya's LDM UNet
    names go through diffusers' own SGM-to-diffusers block mapping), and the kohya file's modules
    are exactly the names sd-scripts generates for SDXL: `lora_unet_` in its own SDXL UNet's
    Transformer2DModels, `lora_te1_`/`lora_te2_` in the two CLIP encoders (transformers 4 nesting)."""
    every_linear = TARGETS + ",ff.net.0.proj,ff.net.2,proj_in,proj_out,fc1,fc2"
    stats = capture(sdxl["model"], sdxl["images"], tmp_path / "stats", targets=every_linear, batch_size=4)
    solved = solve(stats, tmp_path / "solve", mode="cnt-s", rank=2, init=init)
    pretrained = load_pipeline(sdxl["model"], sdxl=True)
    for format in ("diffusers", "kohya"):
        out = export(solved, tmp_path / format, format=format, check=True)
        exported = json.loads((out / "manifest.json").read_text())
        with safe_open(out / exported["adapter_file"], "pt") as handle:
            keys = set(handle.keys())
        writes_base = exported["residual_base"] is not None
        pipe = load_pipeline(out / "base" if writes_base else sdxl["model"], sdxl=True)
        pipe.load_lora_weights(str(out), weight_name=exported["adapter_file"])
        assert_pipeline_computes(pipe, pretrained, factors(solved), residual=writes_base)
        if format == "diffusers":
            assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
            continue
        modules = {key.split(".")[0] for key in keys}
        unet = _sd_scripts_names(_sd_scripts_sdxl_unet(transformer_blocks=1), "lora_unet", ("Transformer2DModel",), ("Linear",))
        encoders = {f"lora_te{i}": _sd_scripts_names(getattr(pretrained, part), f"lora_te{i}", ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))
                    for i, part in ((1, "text_encoder"), (2, "text_encoder_2"))}
        encoders["lora_te1"] = {n.replace("lora_te1_", "lora_te1_text_model_", 1) for n in encoders["lora_te1"]}  # transformers 4's nesting
        assert all(n.startswith("lora_te2_text_model_") for n in encoders["lora_te2"])  # CLIPTextModelWithProjection keeps it
        assert {m for m in modules if m.startswith("lora_unet_")} == unet
        assert {m for m in modules if m.startswith("lora_te1_")} == encoders["lora_te1"]
        assert {m for m in modules if m.startswith("lora_te2_")} == encoders["lora_te2"]


def test_sdxl_kohya_refuses_modules_sd_scripts_does_not_name(sdxl, tmp_path, capsys):
    stats = capture(sdxl["model"], sdxl["images"], tmp_path / "stats", targets="time_emb_proj,to_q", batch_size=4)
    solved = solve(stats, tmp_path / "solve", mode="cnt-s", rank=2)
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--format", "kohya"], "lies outside the SDXL UNet's transformer blocks", tmp_path / "k")
    assert export(solved, tmp_path / "d", format="diffusers").exists()  # diffusers names every module as diffusers does
