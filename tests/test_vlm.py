"""Vision-language models: a seeded tiny LLaVA (CLIP vision tower, projector, Llama language model)
with a real processor setup (the MiniLM tokenizer plus an <image> token, a CLIP image processor, a
chat template), captured from records with images; statistics against hooks over the processor's
own outputs, one record at a time; gradients against a plain backward; the export loaded by PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from cntinit import capture, embedded, export, solve
from cntinit.errors import CntinitError
from cntinit.storage.store import Store

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
            "{% endif %} | {% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
TARGETS = {  # family -> (a vision-tower layer, the projector, a language-model layer)
    "llava": ("model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.multi_modal_projector.linear_1",
              "model.language_model.layers.1.self_attn.q_proj"),
    "paligemma": ("model.vision_tower.encoder.layers.0.self_attn.q_proj", "model.multi_modal_projector.linear",
                  "model.language_model.layers.1.self_attn.q_proj"),
}
PATCHES = {"llava": 17, "paligemma": 4}  # rows a vision layer sees per image: CLIP's 16 patches + CLS; SigLIP's 4 patches


def tokenizer_with_image_token():
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.model_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_llava(directory: Path) -> None:
    """CLIP vision tower (32×32 images, 8×8 patches), a projector, a 2-block Llama; LlavaProcessor."""
    tokenizer = tokenizer_with_image_token()
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                           patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-1, architectures=["LlavaForConditionalGeneration"])
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(config).save_pretrained(directory)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                                chat_template=TEMPLATE, num_additional_image_tokens=1).save_pretrained(directory)


def build_paligemma(directory: Path) -> None:
    """SigLIP vision tower (28×28 images, 14×14 patches), a projector, a 2-block Gemma; PaliGemmaProcessor
    (which puts the image tokens and BOS before the text itself)."""
    tokenizer = tokenizer_with_image_token()
    tokenizer.bos_token = "[CLS]"
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 14}
    text = {"model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512, "pad_token_id": tokenizer.pad_token_id}
    config = transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                          projection_dim=64, architectures=["PaliGemmaForConditionalGeneration"])
    config.vision_config.projection_dim = 64
    torch.manual_seed(0)
    transformers.PaliGemmaForConditionalGeneration(config).save_pretrained(directory)
    images = transformers.SiglipImageProcessor(size={"height": 28, "width": 28})
    images.image_seq_length = 4
    transformers.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=TEMPLATE).save_pretrained(directory)


@pytest.fixture(scope="session")
def vlms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    for family, build in (("llava", build_llava), ("paligemma", build_paligemma)):
        build(root / family)
    return {family: root / family for family in ("llava", "paligemma")}


@pytest.fixture()
def llava(vlms) -> Path:
    return vlms["llava"]


def photos(folder: Path) -> list[str]:
    """Four of scikit-image's sample photos, as PNG and JPEG files of their own sizes; paths relative to the parent."""
    from skimage import data
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, suffix in (("astronaut", "png"), ("coffee", "jpg"), ("chelsea", "png"), ("rocket", "jpg")):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.{suffix}")
        names.append(f"{folder.name}/{name}.{suffix}")
    return names


def write_records(folder: Path, family: str = "llava") -> Path:
    """Chat with an image, text with an image, prompt + completion with images, and (LLaVA) text alone;
    PaliGemma's processor takes one image per record and none without one."""
    names = photos(folder / "pics")
    pair = [names[2], names[3]] if family == "llava" else [names[2]]
    lines = [
        {"images": [names[0]], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                                            {"role": "assistant", "content": "a photo of light"}]},
        {"image": names[1], "text": "And God saw the light, that it was good."},
        {"images": pair, "prompt": "<image>\n" * len(pair) + "compare them:", "completion": " the first is brighter."},
    ] + ([{"text": "Let there be light."}] if family == "llava" else [])
    (folder / "calib.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "calib.jsonl"


@pytest.fixture()
def records(tmp_path) -> Path:
    return write_records(tmp_path)


def expected_inputs(processor, record_file: Path) -> list[tuple[dict, int]]:
    """Each record as its trainer's collator gives it, written out by hand: (inputs, prompt tokens)."""
    cases = []
    for line in (json.loads(line) for line in record_file.read_text().splitlines()):
        pictures = [Image.open(record_file.parent / n).convert("RGB") for n in line.get("images", [line["image"]] if "image" in line else [])]
        if "messages" in line:
            cases.append((processor.apply_chat_template(line["messages"], tokenize=False), pictures, None))
        elif "prompt" in line:
            cases.append((line["prompt"] + line["completion"], pictures, line["prompt"]))
        else:
            cases.append((("<image>\n" if pictures else "") + line["text"], pictures, None))
    out = []
    for text, pictures, prompt in cases:
        inputs = {k: v for k, v in processor(text=[text], images=pictures or None, return_tensors="pt").items() if k != "labels"}
        head = processor(text=[prompt], images=pictures or None, return_tensors="pt")["input_ids"].shape[1] if prompt else 0
        out.append((inputs, head))
    return out


FAMILIES = pytest.mark.parametrize("family", ["llava", "paligemma"])


def model_class(directory: Path):
    return getattr(transformers, json.loads((directory / "config.json").read_text())["architectures"][0])


@FAMILIES
def test_statistics_of_both_towers_equal_hooks_over_the_processors_outputs(vlms, tmp_path, family):
    """Batches of 3 right-padded records against one record at a time, unpadded, through hooks."""
    model_dir, data, names = vlms[family], write_records(tmp_path, family), TARGETS[family]
    store = Store(capture(model_dir, data, tmp_path / "s", targets="re:(" + "|".join(names) + ")", batch_size=3))
    assert store.manifest["model"]["kind"] == "vlm" and store.manifest["data"]["samples"] == len(data.read_text().splitlines())
    model = model_class(model_dir).from_pretrained(model_dir).eval()
    sums = {name: 0 for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: sums.__setitem__(name, sums[name] + (lambda x: x.T @ x)(args[0].reshape(-1, args[0].shape[-1]).double())))
        for name in sums]
    with torch.no_grad():
        for inputs, _ in expected_inputs(transformers.AutoProcessor.from_pretrained(model_dir), data):
            model(**inputs)
    for handle in handles:
        handle.remove()
    for name, expected in sums.items():
        got = store.tensors(store.manifest["modules"][name]["key"])["xxt"].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    pictures = sum(len(line.get("images", [1] if "image" in line else [])) for line in map(json.loads, data.read_text().splitlines()))
    assert store.manifest["stats"][store.manifest["modules"][names[0]]["key"]]["count"] == pictures * PATCHES[family]


@FAMILIES
def test_gradients_are_the_answer_tokens_loss_of_a_plain_backward(vlms, tmp_path, family):
    """--gradients: next-token loss over the text after each prompt, never image tokens or padding."""
    model_dir, data, (vision, _, language) = vlms[family], write_records(tmp_path, family), TARGETS[family]
    store = Store(capture(model_dir, data, tmp_path / "g", targets=f"re:({vision}|{language})", batch_size=1, gradients=True))
    model = model_class(model_dir).from_pretrained(model_dir).eval()
    image_id = model.config.image_token_index
    expected = {name: torch.zeros_like(model.get_submodule(name).weight, dtype=torch.float64) for name in (vision, language)}
    for inputs, head in expected_inputs(transformers.AutoProcessor.from_pretrained(model_dir), data):
        labels = inputs["input_ids"].clone()
        labels[labels == image_id] = -100
        labels[:, :head] = -100
        logits = model(**inputs).logits[:, :-1].flatten(0, 1)
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100).backward()
        for name in expected:
            grad = model.get_submodule(name).weight.grad  # None: a text-only record never runs the vision tower
            expected[name] += grad.double() if grad is not None else 0
    for name, want in expected.items():
        torch.testing.assert_close(store.gradient(name).double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@FAMILIES
def test_an_init_of_both_towers_exports_and_peft_loads_it(vlms, tmp_path, family):
    model_dir, data = vlms[family], write_records(tmp_path, family)
    stats = capture(model_dir, data, tmp_path / "s", targets="re:.*(self_attn\\.(q|v)_proj|multi_modal_projector\\.linear(_1)?)", batch_size=2)
    adapter = export(solve(stats, tmp_path / "init", mode="cnt-s", rank=2), tmp_path / "adapter", check=True)
    assert json.loads((adapter / "manifest.json").read_text())["check"]["max_relative_error"] < 1e-5
    config = json.loads((adapter / "adapter_config.json").read_text())
    targets = config["target_modules"]
    assert any("vision_tower" in t for t in targets) and any("language_model" in t for t in targets) and TARGETS[family][1] in targets
    assert config["task_type"] is None  # a …ForConditionalGeneration: the trainer's class is not told by the name (give --task-type)


def test_offload_gives_the_same_statistics(llava, records, tmp_path):
    names = TARGETS["llava"]
    whole = Store(capture(llava, records, tmp_path / "w", targets="re:(" + "|".join(names) + ")", batch_size=2))
    spread = Store(capture(llava, records, tmp_path / "o", targets="re:(" + "|".join(names) + ")", batch_size=2, offload=True,
                           max_memory="cpu=1MiB"))
    for key in whole.keys:
        torch.testing.assert_close(spread.tensors(key)["xxt"], whole.tensors(key)["xxt"], rtol=1e-5, atol=1e-5)


def test_text_only_records_are_counted_and_a_processor_that_refuses_is_one_line(vlms, llava, records, tmp_path, capsys):
    capture(llava, records, tmp_path / "s", targets="q_proj")
    assert "1 of 4 records have no image: their text runs through the language model alone" in capsys.readouterr().err
    with pytest.raises(CntinitError, match=r"calib.jsonl:4: the model's processor refused these records \(.*\): give records as its "
                                           r"trainer does"):
        capture(vlms["paligemma"], records, tmp_path / "p", targets="q_proj", batch_size=1)


@pytest.mark.parametrize("case, message", [
    ("missing image", r"calib.jsonl:2: image .*gone.png does not exist: fix the path"),
    ("unreadable image", r"calib.jsonl:2: could not read image .*broken.png \(UnidentifiedImageError\): replace or remove it"),
    ("placeholders", r"calib.jsonl:1: 2 image placeholders \(<image>\) for 1 images"),
    ("layerwise", r"--layerwise runs one chain of repeated blocks, and .* is a vision-language model"),
    ("processor", r"could not load the processor of the vision-language model at .*: .* put its own processor files"),
])
def test_bad_vlm_input_is_one_line(llava, records, tmp_path, case, message):
    model, options = llava, {}
    if case == "missing image":
        lines = records.read_text().splitlines()
        lines[1] = json.dumps({"image": "gone.png", "text": "x"})
        records.write_text("\n".join(lines) + "\n")
    elif case == "unreadable image":
        (records.parent / "broken.png").write_bytes(b"not a png")
        lines = records.read_text().splitlines()
        lines[1] = json.dumps({"image": "broken.png", "text": "x"})
        records.write_text("\n".join(lines) + "\n")
    elif case == "placeholders":
        records.write_text(json.dumps({"image": "pics/astronaut.png", "text": "<image> and <image>"}) + "\n")
    elif case == "layerwise":
        options = {"layerwise": True}
    else:
        model = tmp_path / "no-processor"
        shutil.copytree(llava, model)
        for name in ("processor_config.json", "preprocessor_config.json", "chat_template.jinja", "tokenizer_config.json", "tokenizer.json",
                     "vocab.txt", "special_tokens_map.json", "chat_template.json"):
            (model / name).unlink(missing_ok=True)
    with pytest.raises(CntinitError, match=message):
        capture(model, records, tmp_path / "s", targets="q_proj", **options)


@FAMILIES
def test_all_linear_is_peft_s_all_linear_for_the_class(vlms, family):
    """Both towers and the projector, not the output head: the modules PEFT adapts for target_modules="all-linear"."""
    import peft
    from peft.tuners.lora import LoraLayer

    from cntinit.models.linears import select_targets
    ours = set(select_targets(model_class(vlms[family]).from_pretrained(vlms[family]), "all-linear"))
    wrapped = peft.get_peft_model(model_class(vlms[family]).from_pretrained(vlms[family]), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules() if isinstance(module, LoraLayer)}
    assert ours == theirs and any("vision_tower" in n for n in ours) and not any(n.endswith("lm_head") for n in ours)
