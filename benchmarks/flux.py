"""A Flux pipeline's capture at FLUX.1's widths: `cntinit capture` of the transformer's blocks (statistics,
then --gradients) against the plain forward of the same batches (FluxPipeline.encode_prompt, the VAE,
the transformer; nothing recorded), side by side in one process, with the peak device memory of each.

    python benchmarks/flux.py --double 2 --single 4 --samples 16 --device cuda
    python benchmarks/flux.py --shape tiny --device cpu --samples 4          # the smoke test

The pipeline is synthetic (random weights, built on the device, saved once): FLUX.1-dev's transformer
widths (3072 = 24 heads × 128, T5 context 4096, pooled 768, 64 packed latent channels, guidance
embedding) with `--double` of its 19 double blocks and `--single` of its 38 single blocks; CLIP-L's
widths in full; T5-XXL's widths (4096, feed-forward 10240, 64 heads) with `--t5-layers` of its 24;
FLUX.1's VAE. Tokenizers are built in code (tests/imaging.py's). A whole FLUX.1 is then the rows'
fixed part plus 19 + 38 blocks' share: the table says how many blocks it measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from imaging import clip_tokenizer, t5_tokenizer  # noqa: E402

from cntinit import capture, embedded, records  # noqa: E402
from peaks import measured  # noqa: E402

SHAPES = {  # transformer, CLIP, T5, VAE block widths, image side
    "tiny": ({"attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
              "in_channels": 16, "axes_dims_rope": (2, 2, 4)},
             {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
             {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_heads": 4}, (32, 64), 4, 32),
    "flux1": ({"attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
               "in_channels": 64, "axes_dims_rope": (16, 56, 56)},
              {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
              {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_heads": 64}, (128, 256, 512, 512), 16, 512),
}
TARGETS = r"re:transformer\.(single_)?transformer_blocks\..*"  # the modules sd-scripts' Flux LoRA adapts


def build(directory: Path, shape: str, double: int, single: int, t5_layers: int, device: str, dtype: torch.dtype) -> Path:
    transformer, clip, t5, vae_widths, latent_channels, _ = SHAPES[shape]
    tokenizer, t5_tok = clip_tokenizer(max_length=77), t5_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        pipe = diffusers.FluxPipeline(
            transformer=diffusers.FluxTransformer2DModel(patch_size=1, num_layers=double, num_single_layers=single, guidance_embeds=True,
                                                         **transformer),
            text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(
                vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, **clip)),
            text_encoder_2=transformers.T5EncoderModel(transformers.T5Config(
                vocab_size=len(t5_tok), num_layers=t5_layers, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1, **t5)),
            vae=diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_widths, layers_per_block=2,
                                        latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * len(vae_widths),
                                        up_block_types=("UpDecoderBlock2D",) * len(vae_widths), shift_factor=0.1159, scaling_factor=0.3611),
            tokenizer=tokenizer, tokenizer_2=t5_tok, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
        for part in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
            part.to(dtype)
    pipe.save_pretrained(directory)
    del pipe
    return directory


def write_images(folder: Path, samples: int) -> Path:
    """Random photo-sized images captioned with verses (diffusers' metadata.jsonl)."""
    rng = np.random.default_rng(0)
    verses = records.read(embedded.data_file(), max_samples=samples).samples
    folder.mkdir()
    lines = []
    for i, verse in enumerate(verses):
        Image.fromarray(rng.integers(0, 256, size=(720, 960, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        lines.append(json.dumps({"file_name": f"{i}.jpg", "text": verse.content}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def plain_forward(model_dir: Path, images: Path, side: int, batch_size: int, device: str, dtype: torch.dtype) -> None:
    """The same images and captions through the pipeline's own encode_prompt, VAE and transformer (loading included, as in the capture)."""
    pipe = diffusers.FluxPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    pipe.vae.to(torch.float32)
    lines = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    with torch.inference_mode():
        for i in range(0, len(lines), batch_size):
            chunk = lines[i : i + batch_size]
            pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(images / line["file_name"]).convert("RGB").resize((side, side))))
                                  for line in chunk]).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
            states, pooled, text_ids = pipe.encode_prompt([line["text"] for line in chunk], max_sequence_length=512)
            latents = (pipe.vae.encode(pixels).latent_dist.mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            b, c, h, w = latents.shape
            pipe.transformer(hidden_states=pipe._pack_latents(latents, b, c, h, w).to(dtype), timestep=torch.zeros(b, device=device, dtype=dtype),
                             guidance=torch.full((b,), 3.5, device=device), pooled_projections=pooled, encoder_hidden_states=states,
                             txt_ids=text_ids, img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="flux1")
    parser.add_argument("--double", type=int, default=2, help="double blocks of the transformer (FLUX.1 has 19)")
    parser.add_argument("--single", type=int, default=4, help="single blocks of the transformer (FLUX.1 has 38)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5 layers (T5-XXL has 24)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="Write the rows here as JSON.")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    side = SHAPES[args.shape][-1]
    scratch = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    title = (f"Flux capture: synthetic FLUX.1-dev widths ({args.shape}; {args.double} double + {args.single} single blocks, "
             f"T5 {args.t5_layers} layers), {args.samples} images of {side} px with captions, batch {args.batch_size}, {dtype}, "
             f"targets: every Linear of the blocks")
    try:
        model_dir = build(scratch / "model", args.shape, args.double, args.single, args.t5_layers, args.device, dtype)
        images = write_images(scratch / "images", args.samples)

        def run(what: str) -> None:
            if what == "plain forward":
                return plain_forward(model_dir, images, side, args.batch_size, args.device, dtype)
            capture(model_dir, images, scratch / "stats", targets=TARGETS, batch_size=args.batch_size, image_size=side, device=args.device,
                    dtype="bfloat16" if args.device == "cuda" else "float32", gradients=what.endswith("--gradients"), overwrite=True)

        rows = []
        for what in ("plain forward", "cntinit capture", "cntinit capture --gradients"):
            rows.append(measured(what, args.device, functools.partial(run, what)))
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"title": title, "rows": rows}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
