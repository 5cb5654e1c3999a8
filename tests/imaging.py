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
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    tokenizer = clip_tokenizer()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    ))
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
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", the first with its end token

    def clip(cls, **extra):
        return cls(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, **extra))

    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(transformers.CLIPTextModel), text_encoder_2=clip(transformers.CLIPTextModelWithProjection, projection_dim=32),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(directory)
    return directory
