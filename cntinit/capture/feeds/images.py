"""Calibration images: a folder of jpg/png/webp (recursive), optional captions, preprocessing, and the
feed of image batches (no padding) that vision encoders and pipelines share.

Captions follow diffusers' ImageFolder convention: a `metadata.jsonl` (or `captions.jsonl`) in the
folder with one `{"file_name": "sub/a.jpg", "text": "..."}` per image, paths relative to it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ...console import warn
from ...errors import CntinitError, first_line
from ...records import json_line
from .feed import Batch, Feed, Shard, shard_total, share, slices

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_FILES = ("metadata.jsonl", "captions.jsonl")
CAPTION_FIELDS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class Picture:
    path: Path
    caption: str | None


def read_pictures(folder: str | Path, max_samples: int | None = None, prompt: str | None = None,
                  need_captions: bool = False) -> list[Picture]:
    """Every image under `folder`, sorted by relative path, with its caption (or `prompt` for all)."""
    root = Path(folder)
    if not root.is_dir():
        raise CntinitError(f"--data {root} is not a folder: give a folder of .jpg/.png/.webp images")
    named = [p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and not p.is_dir()]
    files = sorted((p for p in named if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    odd = sorted(set(named) - set(files))
    if odd:
        warn(f"skipped {len(odd)} entries named like images that are not regular files (a pipe, a device, a broken link): "
             f"{', '.join(str(p) for p in odd[:3])}")
    if not files:
        raise CntinitError(f"no images in {root}: give a folder of {', '.join(SUFFIXES)} files")
    files = files[:max_samples] if max_samples else files
    captions = _captions(root) if prompt is None else {}
    pictures = []
    for path in files:
        open_rgb(path, header_only=True)  # a bad file fails here, before any forward pass
        caption = prompt if prompt is not None else captions.get(path.relative_to(root).as_posix())
        if need_captions and caption is None:
            raise CntinitError(f"{path} has no caption: list it in {root / CAPTION_FILES[0]} "
                               '({"file_name": ..., "text": ...} per line) or give --prompt for every image')
        pictures.append(Picture(path, caption))
    return pictures


def _captions(root: Path) -> dict[str, str]:
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
        return {}
    captions = {}
    for lineno, line in enumerate(found[0].read_text(encoding="utf-8-sig").splitlines(), start=1):  # a byte-order mark is not data
        if not line.strip():
            continue
        try:
            record = json_line(line)
        except ValueError as exc:
            raise CntinitError(f"{found[0]}:{lineno} is not valid JSON ({exc}): one object per line") from None
        text = next((record[f] for f in CAPTION_FIELDS if isinstance(record, dict) and isinstance(record.get(f), str)), None)
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or text is None:
            raise CntinitError(f'{found[0]}:{lineno} needs "file_name" and "text" strings')
        captions[Path(record["file_name"]).as_posix()] = text
    return captions


def open_rgb(path: Path, header_only: bool = False):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return None if header_only else image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CntinitError(f"could not read image {path} ({type(exc).__name__}): replace or remove it") from None
    except Image.DecompressionBombError as exc:  # PIL's own limit, kept: a few bytes can declare gigapixels
        raise CntinitError(f"could not read image {path} (it declares more pixels than PIL decodes safely: {first_line(exc)}): "
                           "resize or remove it") from None


def fingerprint(pictures: list[Picture], root: str | Path) -> str:
    """sha256 over each image's relative path, bytes and caption: the same folder gives the same value."""
    digest = hashlib.sha256()
    for picture in pictures:
        digest.update(Path(picture.path).relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(Path(picture.path).read_bytes()).digest())
        digest.update((picture.caption or "").encode() + b"\0")
    return "sha256:" + digest.hexdigest()


class Pixels:
    """Images → a (N, 3, H, W) float tensor: the model's own image processor when its directory has
    one, else resize the shorter side to `size` (bicubic), center-crop `size`×`size` (no distortion),
    scale to [0, 1] and normalize by `mean`/`std`."""

    def __init__(self, processor=None, size: int | None = None, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5)):
        if processor is None and size is None:
            raise CntinitError("the model directory has no preprocessor_config.json: give --image-size "
                               "(and --image-mean/--image-std, default 0.5,0.5,0.5)")
        self.processor, self.size = processor, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, paths: list[Path]) -> torch.Tensor:
        images = [open_rgb(p) for p in paths]
        if self.processor is not None and self.size is None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"].float()
        return torch.stack([self._plain(image) for image in images])

    def _plain(self, image) -> torch.Tensor:
        from PIL import Image

        scale = self.size / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (image.size[0] - self.size) // 2, (image.size[1] - self.size) // 2
        cropped = image.crop((left, top, left + self.size, top + self.size))
        array = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return (array.permute(2, 0, 1).float() / 255 - self.mean) / self.std


def feed(pictures: list[Picture], data, batch_size: int, buckets: int, inputs, settings: dict, shard: Shard) -> Feed:
    """`pictures` in batches of `inputs(chunk)`, bucket by bucket (this process's share of each)."""
    every = slices(len(pictures), buckets)
    total = shard_total([len(part) for part in every], shard)
    parts = [share(part, shard) for part in every]

    def batches() -> Iterator[Batch]:
        for bucket, part in enumerate(parts):
            for start in range(part.start, part.stop, batch_size):
                yield bucket, inputs(pictures[start : min(start + batch_size, part.stop)]), None, None

    return Feed(inputs(pictures[:1]), total, "img", batches,
                {"fingerprint": fingerprint(pictures, data), "sources": [str(Path(data).absolute())],
                 "samples": len(pictures), "sequences": total}, settings)
