"""Flux and Stable Diffusion 3 pipelines (diffusion transformers trained by flow matching): capture
statistics and gradients against the pipelines' own conditioning computed here, export diffusers
files that `load_lora_weights` loads and kohya files with sd-scripts' original (fused) names."""

import json
import shutil
import warnings

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cntinit import capture, export, solve
from cntinit.export.formats import kohya
from cntinit.storage import store
from conftest import assert_refused
from imaging import build_flux, build_sd, build_sd3, write_images
from test_diffusion import assert_pipeline_computes, captions_of, pixels_of, summing_linear_inputs
from test_export import factors

SIZE = 16  # pixels: 8×8 latents, 4×4 packed Flux patches
PIPELINES = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline}
ENCODERS = {"flux": ("text_encoder", "text_encoder_2"), "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}
DIFFUSERS_TARGETS = {"flux": r"re:(transformer|text_encoder)\..*", "sd3": r"re:(transformer|text_encoder|text_encoder_2)\..*"}
BLOCK_TARGETS = r"re:(transformer\.(single_)?transformer_blocks\..*|text_encoder(_2|_3)?\..*)"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    images = write_images(root / "images", count=5)
    built = {"flux": build_flux(root / "flux"), "sd3": build_sd3(root / "sd3")}
    stats = {name: capture(model, images, root / f"stats_{name}", targets="all-linear", batch_size=2, image_size=SIZE)
             for name, model in built.items()}
    return {"images": images, "models": built, "stats": stats}


def load(kind, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PIPELINES[kind].from_pretrained(path)


def conditioning(kind, pipe, captions):
    """(the transformer's text keyword arguments) as the pipeline's own encode_prompt makes them."""
    if kind == "flux":
        states, pooled, text_ids = pipe.encode_prompt(captions, captions, max_sequence_length=512)  # dev: sd-scripts' 512 T5 tokens
        return {"encoder_hidden_states": states, "pooled_projections": pooled, "txt_ids": text_ids}
    states, _, pooled, _ = pipe.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False, max_sequence_length=256)
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def denoise(kind, pipe, latents, timestep, text):
    """The transformer's prediction for `latents` at scheduler timestep `timestep`, as the pipeline calls it."""
    if kind == "sd3":
        return pipe.transformer(hidden_states=latents, timestep=timestep, **text).sample
    b, c, h, w = latents.shape
    return pipe.transformer(hidden_states=pipe._pack_latents(latents, b, c, h, w), timestep=timestep / 1000,
                            guidance=torch.full((b,), 3.5), img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                            **text).sample


def clean_latents(pipe, images):
    vae = pipe.vae
    return (vae.encode(pixels_of(images, SIZE)).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("noise_timestep", [None, 400])
def test_statistics_match_the_pipelines_own_conditioning(pipelines, tmp_path, kind, noise_timestep):
    images = pipelines["images"]
    stats = capture(pipelines["models"][kind], images, tmp_path / "stats", targets="all-linear", batch_size=8, image_size=SIZE,
                    noise_timestep=noise_timestep, seed=3)
    pipe = load(kind, pipelines["models"][kind])
    sums = summing_linear_inputs(pipe, ("transformer", *ENCODERS[kind]))
    with torch.no_grad():
        text = conditioning(kind, pipe, captions_of(images))
        latents, timestep = clean_latents(pipe, images), torch.zeros(5)
        if noise_timestep is not None:  # σ of the training schedule at index N − 1 − t, noise from the capture's seed
            schedule = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            index = 999 - noise_timestep
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
            latents = (1 - schedule.sigmas[index]) * latents + schedule.sigmas[index] * noise
            timestep = torch.full((5,), float(schedule.timesteps[index]))
        denoise(kind, pipe, latents, timestep, text)
    opened = store.Store(stats)
    assert {n.split(".")[0] for n in opened.manifest["modules"]} == {"transformer", *ENCODERS[kind]}
    assert opened.manifest["model"]["layout"] == kind
    for name, entry in opened.manifest["modules"].items():
        got = opened.tensors(entry["key"])["xxt"].double()
        torch.testing.assert_close(got, sums[name], rtol=1e-4, atol=1e-4 * float(sums[name].abs().max()), msg=name)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_gradients_are_of_the_flow_matching_loss(pipelines, tmp_path, kind):
    """capture --gradients: each target's gradient of the flow-matching loss — σ = sigmas[i] at an index
    drawn uniformly, then the noise, from the capture's seed; MSE of the prediction against the velocity
    n − x₀, unweighted — computed here by autograd on the pipeline diffusers loads."""
    images = pipelines["images"]
    stats = store.Store(capture(pipelines["models"][kind], images, tmp_path / "stats", targets="all-linear", batch_size=8,
                                image_size=SIZE, gradients=True, seed=3))
    pipe = load(kind, pipelines["models"][kind])
    schedule = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        latents = clean_latents(pipe, images)
    index = (torch.rand(5, generator=generator) * 1000).long()
    noise = torch.randn(latents.shape, generator=generator)
    sigma = schedule.sigmas[index].view(-1, 1, 1, 1)
    prediction = denoise(kind, pipe, (1 - sigma) * latents + sigma * noise, schedule.timesteps[index], conditioning(kind, pipe, captions_of(images)))
    target = noise - latents
    if kind == "flux":
        target = pipe._pack_latents(target, *target.shape)
    loss = torch.nn.functional.mse_loss(prediction, target)
    names = [n for n in stats.manifest["modules"] if stats.manifest["modules"][n].get("gradient", True)]
    weights = [getattr(pipe, n.split(".")[0]).get_submodule(n.split(".", 1)[1]).weight for n in names]
    expected = torch.autograd.grad(loss, weights, allow_unused=True)
    assert stats.manifest["gradients"]["mean_loss"] == pytest.approx(float(loss), rel=1e-5)
    reached = 0  # float32 through 512 T5 positions: 1e-4 of the largest entry apart, so compared to 3e-4 of it
    for name, want in zip(names, expected):
        want = torch.zeros_like(weights[names.index(name)]) if want is None else want
        got = stats.gradient(name).double()
        torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=3e-4 * float(want.abs().max()) + 1e-12, msg=lambda m: f"{name}: {m}")
        reached += bool(want.abs().max() > 0)
    assert reached > len(names) // 2


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("mode", ["cnt-s", "lora-one"])
def test_diffusers_exports_load_with_load_lora_weights(pipelines, tmp_path, kind, mode):
    """A residual CNT (its base written) and an offset init (LoRA-One's, from gradients) load in
    diffusers' Flux/SD3 pipelines and compute what the solve says."""
    stats = pipelines["stats"][kind]
    if mode == "lora-one":
        stats = capture(pipelines["models"][kind], pipelines["images"], tmp_path / "grads", targets="all-linear", batch_size=2,
                        image_size=SIZE, gradients=True)
    solved = solve(stats, tmp_path / "solve", mode=mode, rank=2, targets=DIFFUSERS_TARGETS[kind],
                   **({"init": "residual"} if mode == "cnt-s" else {}))
    out = export(solved, tmp_path / "out", format="diffusers", check=True)
    exported = json.loads((out / "manifest.json").read_text())
    residual = exported["init"] == "residual"
    assert residual == (mode == "cnt-s") and exported["check"]["max_relative_error"] < 1e-6
    pipe = load(kind, out / "base" if residual else pipelines["models"][kind])
    pipe.load_lora_weights(str(out), weight_name=exported["adapter_file"])
    assert_pipeline_computes(pipe, load(kind, pipelines["models"][kind]), factors(solved), residual=residual)


def test_flux_kohya_loads_through_diffusers_kohya_flux_converter(pipelines, tmp_path):
    """sd-scripts' names for Flux's double blocks (fused qkv) and CLIP: diffusers' own kohya-Flux reader
    (load_lora_weights on the file) splits them back into to_q/to_k/to_v and computes W + BA."""
    targets = r"re:(transformer\.transformer_blocks\..*|text_encoder\..*)"
    solved = solve(pipelines["stats"]["flux"], tmp_path / "solve", mode="pissa", rank=2, targets=targets)
    out = export(solved, tmp_path / "out", format="kohya", check=True)
    with safe_open(out / kohya.FILE, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        qkv = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert {k.split(".")[0] for k in keys if k.startswith("lora_unet_")} == {
        f"lora_unet_double_blocks_0_{m}" for m in ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
                                                   "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin")}
    assert qkv.shape == (48, 6) and not qkv[:16, 2:].any() and not qkv[16:32, [0, 1, 4, 5]].any()  # block-diagonal
    pipe = load("flux", pipelines["models"]["flux"])
    pipe.load_lora_weights(str(out), weight_name=kohya.FILE)
    assert_pipeline_computes(pipe, load("flux", pipelines["models"]["flux"]), factors(solved), residual=False)


def test_fused_layers_at_flux_widths_split_back_in_diffusers_converter():
    """At FLUX.1's widths (3072; the converter assumes them) a single block's linear1 — q, k, v and the
    MLP input — and a double block's qkv with parts of different ranks and alphas (a VAS solve with
    --fixed-alpha) and one part left out: diffusers' converter gives each module exactly its B@A."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    generator = torch.Generator().manual_seed(0)
    parts, tensors = {}, {}
    for name, key, rank, alpha, rows in [
        ("single_transformer_blocks.0.attn.to_q", "lora_unet_single_blocks_0_linear1:0", 2, 4.0, 3072),
        ("single_transformer_blocks.0.attn.to_k", "lora_unet_single_blocks_0_linear1:1", 2, 4.0, 3072),
        ("single_transformer_blocks.0.attn.to_v", "lora_unet_single_blocks_0_linear1:2", 2, 4.0, 3072),
        ("single_transformer_blocks.0.proj_mlp", "lora_unet_single_blocks_0_linear1:3", 2, 4.0, 12288),
        ("transformer_blocks.0.attn.to_q", "lora_unet_double_blocks_0_img_attn_qkv:0", 3, 8.0, 3072),
        ("transformer_blocks.0.attn.to_v", "lora_unet_double_blocks_0_img_attn_qkv:2", 1, 8.0, 3072),
    ]:
        b, a = torch.randn(rows, rank, generator=generator), torch.randn(rank, 3072, generator=generator)
        parts[name] = alpha / rank * b.double() @ a.double()  # what sd-scripts' module adds
        tensors |= kohya.tensors(key, b, a, alpha)
    converted = _convert_kohya_flux_lora_to_diffusers(kohya.fuse(tensors, zero_update=False))
    for name, want in parts.items():
        got = converted[f"transformer.{name}.lora_B.weight"].double() @ converted[f"transformer.{name}.lora_A.weight"].double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    k = converted["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"]
    assert not k.any()  # the part left out: zero rows


def test_sd3_kohya_names_are_sd_scripts_mmdit_names(pipelines, tmp_path):
    """The file's layers are the Linear modules sd-scripts' MMDiT has for this model (listed from its
    library/sd3_models.py with depth 2, the first block with attn2, the last context-pre-only), and the
    last block's context modulation holds B's rows with shift and scale swapped, as SAI's checkpoint does."""
    solved = solve(pipelines["stats"]["sd3"], tmp_path / "solve", mode="cnt-s", rank=2, targets=BLOCK_TARGETS, init="residual")
    out = export(solved, tmp_path / "out", format="kohya", check=True)
    file = load_file(out / kohya.FILE)
    joint = {k.split(".")[0].removeprefix("lora_unet_") for k in file if k.startswith("lora_unet_")}
    assert joint == {f"joint_blocks_0_{m}" for m in (
        "context_block_adaLN_modulation_1", "context_block_attn_proj", "context_block_attn_qkv", "context_block_mlp_fc1",
        "context_block_mlp_fc2", "x_block_adaLN_modulation_1", "x_block_attn_proj", "x_block_attn_qkv", "x_block_attn2_proj",
        "x_block_attn2_qkv", "x_block_mlp_fc1", "x_block_mlp_fc2")} | {f"joint_blocks_1_{m}" for m in (
            "context_block_adaLN_modulation_1", "context_block_attn_qkv", "x_block_adaLN_modulation_1", "x_block_attn_proj",
            "x_block_attn_qkv", "x_block_mlp_fc1", "x_block_mlp_fc2")}
    assert {k.split("_")[1] for k in file if not k.startswith("lora_unet_")} == {"te1", "te2", "te3"}
    b, a = factors(solved)["transformer.transformer_blocks.1.norm1_context.linear"]
    layer = "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"
    stored = float(file[f"{layer}.alpha"]) / 2 * file[f"{layer}.lora_up.weight"].double() @ file[f"{layer}.lora_down.weight"].double()
    want = b.double() @ a.double()
    torch.testing.assert_close(stored, torch.cat(want.chunk(2)[::-1]), rtol=1e-6, atol=1e-9)


def test_flux_sd3_errors(pipelines, tmp_path, capsys):
    flux = pipelines["models"]["flux"]
    broken = shutil.copytree(flux, tmp_path / "no_transformer")
    shutil.rmtree(broken / "transformer")
    assert_refused(capsys, ["capture", broken, "-d", pipelines["images"], "--image-size", SIZE],
                   "lacks the pipeline component folder transformer: give a complete Flux pipeline directory", tmp_path / "a")
    (broken / "model_index.json").write_text("[1, 2]")
    assert_refused(capsys, ["capture", broken, "-d", pipelines["images"]], "model_index.json is not a JSON object of components", tmp_path / "j")
    tokenizer = shutil.copytree(flux, tmp_path / "bad_t5")
    (tokenizer / "tokenizer_2" / "tokenizer.json").write_text("{not json")
    assert_refused(capsys, ["capture", tokenizer, "-d", pipelines["images"], "--image-size", SIZE],
                   f"could not load the tokenizer at {tokenizer / 'tokenizer_2'}", tmp_path / "b")
    heun = shutil.copytree(flux, tmp_path / "heun")
    index = json.loads((heun / "model_index.json").read_text())
    (heun / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", "FlowMatchHeunDiscreteScheduler"]}))
    assert_refused(capsys, ["capture", heun, "-d", pipelines["images"], "--image-size", SIZE, "--gradients"],
                   "this pipeline's scheduler is FlowMatchHeunDiscreteScheduler, whose training loss is not defined here yet", tmp_path / "c")
    assert_refused(capsys, ["capture", flux, "-d", pipelines["images"], "--image-size", 18],
                   "--image-size 18 is not a multiple of 4, which a Flux pipeline's latents need: give --image-size 16", tmp_path / "d")
    solved = solve(pipelines["stats"]["flux"], tmp_path / "solve", mode="pissa", rank=2)
    capsys.readouterr()
    assert_refused(capsys, ["export", solved, "--format", "diffusers"], "is in the T5 text encoder, which diffusers' load_lora_weights "
                   "does not load", tmp_path / "e")
    assert_refused(capsys, ["export", solved, "--format", "kohya"], "transformer.time_text_embed.timestep_embedder.linear_1 lies outside "
                   "Flux's double and single blocks", tmp_path / "f")
    assert_refused(capsys, ["capture", build_sd(tmp_path / "sd"), "-d", pipelines["images"], "--t5-tokens", 64],
                   "--t5-tokens sets the prompt length of a T5 text encoder, and a Stable Diffusion pipeline has none", tmp_path / "g")
    assert_refused(capsys, ["capture", flux, "-d", pipelines["images"], "--image-size", SIZE, "--layerwise"],
                   "is a diffusers pipeline, whose text encoders and transformer are not one", tmp_path / "i")
    assert_refused(capsys, ["capture", flux, "-d", pipelines["images"], "--image-size", SIZE, "--t5-tokens", 0],
                   "--t5-tokens must be a positive number of tokens, got 0", tmp_path / "h")
    offset = solve(pipelines["stats"]["flux"], tmp_path / "offset", mode="lora", rank=2, targets=BLOCK_TARGETS)
    only = export(offset, tmp_path / "only", format="kohya", unet_only=True)
    assert all(k.startswith("lora_unet_") for k in load_file(only / kohya.FILE))


def t5_rows(stats, encoder):
    opened = store.Store(stats)
    entry = opened.manifest["modules"][f"{encoder}.encoder.block.0.layer.0.SelfAttention.q"]
    return opened.manifest["stats"][entry["key"]]["count"], opened.manifest["capture"].get("t5_tokens")


def test_t5_prompts_are_padded_as_sd_scripts_pads_them(pipelines, tmp_path):
    """Flux dev 512 T5 tokens, schnell (no guidance embedding) 256, SD3 256; --t5-tokens sets it; the
    store records it. Every position counts (no mask), so a T5 layer sees 5 × that many rows."""
    images = pipelines["images"]
    schnell = build_flux(tmp_path / "schnell", guidance=False)
    assert t5_rows(pipelines["stats"]["flux"], "text_encoder_2") == (5 * 512, 512)
    assert t5_rows(pipelines["stats"]["sd3"], "text_encoder_3") == (5 * 256, 256)
    assert t5_rows(capture(schnell, images, tmp_path / "s", targets="all-linear", image_size=SIZE), "text_encoder_2") == (5 * 256, 256)
    assert t5_rows(capture(schnell, images, tmp_path / "t", targets="all-linear", image_size=SIZE, t5_tokens=64),
                   "text_encoder_2") == (5 * 64, 64)


def test_sd3_saved_without_t5_conditions_with_zeros_as_its_pipeline(pipelines, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.StableDiffusion3Pipeline.from_pretrained(pipelines["models"]["sd3"], text_encoder_3=None,
                                                           tokenizer_3=None).save_pretrained(tmp_path / "model")
    images = pipelines["images"]
    stats = store.Store(capture(tmp_path / "model", images, tmp_path / "stats", targets="all-linear", batch_size=8, image_size=SIZE))
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tmp_path / "model", text_encoder_3=None, tokenizer_3=None)
    sums = summing_linear_inputs(pipe, ("transformer",))
    with torch.no_grad():
        denoise("sd3", pipe, clean_latents(pipe, images), torch.zeros(5), conditioning("sd3", pipe, captions_of(images)))
    assert {n.split(".")[0] for n in stats.manifest["modules"]} == {"transformer", "text_encoder", "text_encoder_2"}
    for name, entry in stats.manifest["modules"].items():
        if name.startswith("transformer."):
            torch.testing.assert_close(stats.tensors(entry["key"])["xxt"].double(), sums[name], rtol=1e-4,
                                       atol=1e-4 * float(sums[name].abs().max()), msg=name)
