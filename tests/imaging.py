"""Tiny vision models, a tiny Stable-Diffusion pipeline and generated images, for the image tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

PROMPTS = ["a photo of sks dog", "a red square on grass", "two circles", "a blue sky at noon", "noise"]


def write_images(folder: Path, count: int = 5, captions: bool = True, size: int = 24, seed: int = 0) -> Path:
    """`count` seeded RGB images of varied sizes (png, jpg and webp, one in a subfolder), with a metadata.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        height, width = size + 4 * (i % 3), size + 6 * (i % 2)
        base = rng.integers(0, 256, size=(1, 1, 3))
        array = np.clip(base + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
        name = [f"img{i}.png", f"img{i}.jpg", f"sub/img{i}.webp"][i % 3]
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(folder / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        records.append({"file_name": name, "text": PROMPTS[i % len(PROMPTS)]})
    if captions:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def build_vit(directory: Path, processor: bool = True, seed: int = 0) -> Path:
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, architectures=["ViTModel"])
    torch.manual_seed(seed)
    transformers.ViTModel(config).save_pretrained(directory)
    if processor:
        transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6],
                                       image_std=[0.2, 0.25, 0.3]).save_pretrained(directory)
    return directory


def clip_tokenizer(max_length: int = 16):
    """A byte-level CLIP tokenizer with no merges: every character is a token (vocab 514)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(characters + [c + "</w>" for c in characters])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_sd(directory: Path, seed: int = 0) -> Path:
    """A seeded tiny StableDiffusionPipeline: 16-pixel images, 8×8 latents, a 2-layer CLIP text encoder."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae = _vae()
    tokenizer = clip_tokenizer()
    text_encoder = _clip(tokenizer)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def build_sdxl(directory: Path, seed: int = 0) -> Path:
    """A seeded tiny StableDiffusionXLPipeline laid out as SDXL's UNet is (so sd-scripts' SDXL block
    numbering applies): three levels of two layers, cross-attention in levels 2 and 3 (one
    transformer block each here), text_time added conditioning; two CLIP text encoders, the
    second with a projection, their penultimate states side by side as cross-attention input."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 1), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32,
        norm_num_groups=32,
    )
    vae = _vae()
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", the first with its end token
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=_clip(tokenizer), text_encoder_2=_clip(tokenizer, transformers.CLIPTextModelWithProjection, projection_dim=32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(directory)
    return directory


def t5_tokenizer():
    """A T5 tokenizer built here (no spiece.model ships offline): a Unigram model over single characters
    with T5's specials (pad 0, eos 1, unk 2) and its "▁" word marks, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    characters = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in characters] + [("▁" + c, -2.5) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def _t5(tokenizer, width: int):
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _vae(**factors):
    """The tiny VAE every pipeline here has: 2× downsampling, 4 latent channels (`factors`: Flux's and
    SD3's shift and scaling factors)."""
    import diffusers

    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, **factors)


def _clip(tokenizer, cls=None, **extra):
    return (cls or transformers.CLIPTextModel)(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, **extra))


def build_flux(directory: Path, seed: int = 0, guidance: bool = True) -> Path:
    """A seeded tiny FluxPipeline (dev with `guidance`, else schnell): one double and one single block of
    width 16, latents of 4 channels packed 2×2 into 16, CLIP (pooled) and T5 text encoders, the
    flow-matching scheduler with Flux's dynamic shifting."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=_vae(shift_factor=0.1, scaling_factor=0.5),
        text_encoder=_clip(tokenizer), tokenizer=tokenizer, text_encoder_2=_t5(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


def build_sd3(directory: Path, seed: int = 0) -> Path:
    """A seeded tiny StableDiffusion3Pipeline: two joint blocks of width 16 (the last context-pre-only,
    the first with SD3.5's second attention), CLIP-L and CLIP-G with projections, T5 of width 64
    (wider than the two CLIPs side by side, as in SD3), static shift 3."""
    import diffusers

    torch.manual_seed(seed)
    tokenizer, t5_tok = clip_tokenizer(), t5_tokenizer()
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=16, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,))
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(shift_factor=0.1, scaling_factor=0.5),
        text_encoder=_clip(tokenizer, transformers.CLIPTextModelWithProjection, projection_dim=32), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, transformers.CLIPTextModelWithProjection, projection_dim=32), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(t5_tok, 64), tokenizer_3=t5_tok, transformer=transformer)
    pipe.save_pretrained(directory)
    return directory
