"""Vision encoders: capture from a folder of images, solve, export PEFT, load with PEFT."""

import json
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers
from PIL import Image

from cntinit import capture, export, solve
from cntinit.storage import store
from conftest import assert_refused, run
from imaging import build_vit, write_images
from test_export import assert_modules_add_exactly_ba, factors


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    return {"model": build_vit(root / "vit"), "bare": build_vit(root / "bare", processor=False),
            "images": write_images(root / "images", count=6)}


def independent_sums(model_dir, pixel_values) -> dict[str, torch.Tensor]:
    """Σxxᵀ over every token (patches and CLS) entering each linear module, from plain forward hooks."""
    model = transformers.ViTModel.from_pretrained(model_dir).eval()
    sums = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(pixel_values=pixel_values)
    return sums


def image_paths(folder):
    return sorted((p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".webp")), key=lambda p: p.relative_to(folder).as_posix())


def test_statistics_use_the_models_image_processor(vit, tmp_path):
    stats = capture(vit["model"], vit["images"], tmp_path / "stats", batch_size=4)
    processor = transformers.AutoImageProcessor.from_pretrained(vit["model"])
    pixels = processor(images=[Image.open(p).convert("RGB") for p in image_paths(vit["images"])], return_tensors="pt")["pixel_values"]
    want = independent_sums(vit["model"], pixels)
    opened = store.Store(stats)
    manifest = opened.manifest
    assert manifest["model"]["kind"] == "vision" and manifest["data"]["samples"] == 6
    assert manifest["data"]["tokens"] == 6 * (16 // 4) ** 2 + 6  # patches and the CLS token of every image
    for name, entry in manifest["modules"].items():
        got = opened.tensors(entry["key"])["xxt"].double()
        torch.testing.assert_close(got, want[name], rtol=1e-4, atol=1e-4 * float(want[name].abs().max()))


def test_explicit_image_size_without_a_processor_config(vit, tmp_path, capsys):
    code, _, err = run(capsys, "capture", vit["bare"], "--data", vit["images"], "-o", tmp_path / "refused")
    assert code == 2 and "no preprocessor_config.json: give --image-size" in err and err.count("\n") == 1
    stats = capture(vit["bare"], vit["images"], tmp_path / "stats", image_size=16, image_mean=(0.4, 0.5, 0.6),
                    image_std=(0.2, 0.25, 0.3))
    # a resize of the shorter side to 16 and a center crop, then (x/255 − mean)/std: independently here
    pixels = []
    for path in image_paths(vit["images"]):
        image = Image.open(path).convert("RGB")
        scale = 16 / min(image.size)
        image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), Image.Resampling.BICUBIC)
        left, top = (image.size[0] - 16) // 2, (image.size[1] - 16) // 2
        array = torch.tensor(np.asarray(image.crop((left, top, left + 16, top + 16))), dtype=torch.float32)
        pixels.append((array.permute(2, 0, 1) / 255 - torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1))
    want = independent_sums(vit["bare"], torch.stack(pixels))
    opened = store.Store(stats)
    for name, entry in opened.manifest["modules"].items():
        torch.testing.assert_close(opened.tensors(entry["key"])["xxt"].double(), want[name], rtol=1e-4,
                                   atol=1e-4 * float(want[name].abs().max()))


@pytest.mark.parametrize("mode, init", [("cnt-s", "offset"), ("corda", "residual")])
def test_vision_adapter_loads_in_peft(vit, tmp_path, mode, init):
    stats = capture(vit["model"], vit["images"], tmp_path / "stats")
    solved = solve(stats, tmp_path / "solve", mode=mode, rank=4, vas=mode == "cnt-s")
    out = export(solved, tmp_path / "adapter", alpha=8)
    exported = json.loads((out / "manifest.json").read_text())
    assert exported["init"] == init
    base_dir = out / "base" if init == "residual" else vit["model"]
    base = transformers.ViTModel.from_pretrained(base_dir).eval()
    wrapped = peft.PeftModel.from_pretrained(base, out)
    pretrained = transformers.ViTModel.from_pretrained(vit["model"]).eval()
    assert_modules_add_exactly_ba(wrapped, pretrained, factors(solved), residual=init == "residual")


@pytest.mark.parametrize("config", [
    transformers.Dinov2Config(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              mlp_ratio=2, architectures=["Dinov2Model"]),
    transformers.CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, architectures=["CLIPVisionModel"]),
], ids=["dinov2", "clip-vision"])
def test_other_vision_encoders(vit, tmp_path, config):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    getattr(transformers, config.architectures[0])(config).save_pretrained(model_dir)
    stats = capture(model_dir, vit["images"], tmp_path / "stats", image_size=16)
    assert store.Store(stats).manifest["model"]["kind"] == "vision"
    solved = solve(stats, tmp_path / "solve", mode="cnt-x", rank=4)
    out = export(solved, tmp_path / "adapter")
    wrapped = peft.PeftModel.from_pretrained(getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval(), out)
    pretrained = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    assert_modules_add_exactly_ba(wrapped, pretrained, factors(solved))


def test_image_folder_errors(vit, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    assert_refused(capsys, ["capture", vit["model"], "--data", empty], "no images in", tmp_path / "a")
    broken = write_images(tmp_path / "broken", count=2)
    (broken / "img9.png").write_bytes(b"not a png at all")
    assert_refused(capsys, ["capture", vit["model"], "--data", broken], "could not read image", tmp_path / "b")
    assert_refused(capsys, ["capture", vit["model"], "--data", vit["images"], "--prompt", "x"],
                   "--prompt does not apply to a vision model", tmp_path / "c")
    assert_refused(capsys, ["capture", vit["model"], "--data", vit["images"], "--image-mean", "0.5,0.5"],
                   "--image-mean needs one value per RGB channel", tmp_path / "d")
    damaged = shutil.copytree(vit["model"], tmp_path / "damaged")
    (damaged / "preprocessor_config.json").write_text("{not json")
    assert_refused(capsys, ["capture", damaged, "--data", vit["images"]], f"could not load the image processor at {damaged}: ",
                   tmp_path / "e")  # was a traceback


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` × `height` pixels and holds none: what a decompression bomb shows PIL first."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_and_what_is_not_a_file_are_named(vit, tmp_path, capsys):
    """A PNG declaring 50000 × 50000 pixels stopped with PIL's DecompressionBombError traceback; a pipe or a
    link to a device named like an image was passed over without a word."""
    import os

    bomb = write_images(tmp_path / "bomb", count=2)
    (bomb / "huge.png").write_bytes(png_header(50_000, 50_000))
    assert_refused(capsys, ["capture", vit["model"], "--data", bomb], f"could not read image {bomb / 'huge.png'} (it declares more pixels "
                   "than PIL decodes safely:", tmp_path / "a")
    odd = write_images(tmp_path / "odd", count=2)
    os.mkfifo(odd / "pipe.png")
    (odd / "zero.png").symlink_to("/dev/zero")
    code, _, err = run(capsys, "capture", vit["model"], "--data", odd, "-o", tmp_path / "b")
    assert code == 0 and "skipped 2 entries named like images that are not regular files (a pipe, a device, a broken link)" in err, err
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["data"]["samples"] == 2
