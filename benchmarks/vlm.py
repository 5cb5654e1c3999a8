"""A vision-language model's capture at LLaVA-1.5-7B's widths: `cntinit capture` (both towers, every
linear layer) against the plain forward of the same processed batches, side by side in one process.

    python benchmarks/vlm.py --shape llava-7b --blocks 2 --samples 32 --device cuda
    python benchmarks/vlm.py --shape tiny --device cpu --samples 4          # the smoke test

The model is synthetic (random weights, built on the device, saved once): LLaVA-1.5-7B's vision tower
(CLIP ViT-L/14 at 336 px: 24 layers, width 1024, 577 rows per image) and projector in full, and
`--blocks` of its 32 Llama-2-7B blocks; the processor is the embedded tokenizer with an <image>
token (576 per image, as LLaVA-1.5's) and a CLIP image processor. Records: one random photo-sized
image and a verse each. Reports seconds (model loading included in both) and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from cntinit import capture, embedded, records
from peaks import measured

SHAPES = {  # vision tower, language model (per block), image side, patch
    "tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
             {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2}, 32, 8),
    "llava-7b": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
                 {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}, 336, 14),
}


def build(directory: Path, shape: str, blocks: int, device: str, dtype: torch.dtype) -> Path:
    vision, text, side, patch = SHAPES[shape]
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=side, patch_size=patch, projection_dim=text["hidden_size"], **vision),
        text_config=transformers.LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=blocks, max_position_embeddings=4096,
                                             pad_token_id=tokenizer.pad_token_id, **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), architectures=["LlavaForConditionalGeneration"])
    torch.manual_seed(0)
    with torch.device(device):
        net = transformers.LlavaForConditionalGeneration(config).to(dtype)
    net.save_pretrained(directory)
    del net
    images = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1).save_pretrained(directory)
    return directory


def write_records(folder: Path, samples: int) -> Path:
    rng = np.random.default_rng(0)
    verses = records.read(embedded.data_file(), max_samples=samples).samples
    lines = []
    for i, verse in enumerate(verses):
        Image.fromarray(rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        lines.append(json.dumps({"image": f"{i}.jpg", "text": verse.content}))
    (folder / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "calib.jsonl"


def plain_forward(model_dir: Path, data: Path, batch_size: int, device: str, dtype: torch.dtype) -> None:
    """The same records through the processor and the model, nothing recorded (loading included, as in the capture)."""
    net = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    with torch.inference_mode():
        for i in range(0, len(lines), batch_size):
            chunk = lines[i : i + batch_size]
            inputs = processor(text=["<image>\n" + line["text"] for line in chunk], padding=True, return_tensors="pt",
                               images=[Image.open(data.parent / line["image"]).convert("RGB") for line in chunk])
            net(**{k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llava-7b")
    parser.add_argument("--blocks", type=int, default=2, help="Llama blocks of the language model (LLaVA-1.5-7B has 32).")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="Write the rows here as JSON.")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    scratch = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    try:
        model_dir, data = build(scratch / "model", args.shape, args.blocks, args.device, dtype), write_records(scratch, args.samples)
        rows = [measured("plain forward", args.device, lambda: plain_forward(model_dir, data, args.batch_size, args.device, dtype))]
        print(json.dumps(rows[-1]), flush=True)
        rows.append(measured("cntinit capture (all-linear)", args.device, lambda: capture(
            model_dir, data, scratch / "stats", batch_size=args.batch_size, seq_len=1024, device=args.device,
            dtype="bfloat16" if args.device == "cuda" else "float32", overwrite=True)))
        print(json.dumps(rows[-1]), flush=True)
        title = (f"VLM capture: synthetic LLaVA-1.5-7B widths ({args.shape}, {args.blocks} language blocks), {args.samples} records of "
                 f"one 640×480 image + a verse, batch {args.batch_size}, {dtype}")
        if args.json:
            args.json.write_text(json.dumps({"title": title, "rows": rows}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
