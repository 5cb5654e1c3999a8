"""The capture stage: stream calibration data (text, images, images with prompts) through a model
and sum each target's input statistics (and, with gradients, its weight's loss gradient) into a store.

The arguments are checked before anything loads, the model is loaded (whole, spread by --offload,
or built empty for --layerwise), the feed for its kind of input is built (feeds/), and the loop
runs — the whole model per batch (stream.py) or one block at a time (layerwise.py) — before the
store is written whole (storage/store.py).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import console, distributed
from ..console import log, warn
from ..errors import CntinitError, not_one_of
from ..models import fingerprints, linears, loading, named_weights
from ..models.linears import ALL_LINEAR
from ..models.placement import offload_placement, place, resolve_device, resolve_dtype
from ..models.source import locate
from ..storage import checkpoint, store
from ..storage.atomic import atomic_directory, check_name
from . import feeds, gradients, layerwise, stream
from .blocks import chain, chain_of_blocks, check_gradient_targets
from .gradients import GradientSums

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
TOKENS = ("text", "vlm")  # the kinds whose data counts tokens (the others count rows: patches, latent pixels)


def _offload_dtype(dtype: str, dev: torch.device) -> torch.dtype | str:
    """The dtype accelerate loads an offloaded model in: as resolve_dtype, the checkpoint's on GPU."""
    if dtype == "auto":
        return "auto" if dev.type == "cuda" else torch.float32
    return resolve_dtype(dtype, None, dev)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'1/4' → (1, 4); None → the whole data, (0, 1)."""
    if text is None:
        return (0, 1)
    index, sep, count = str(text).partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise CntinitError(f"--shard {text} must be INDEX/COUNT with 0 ≤ INDEX < COUNT, e.g. 0/4 for the first of four shards")
    return int(index), int(count)


def capture(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    targets: str | list[str] = ALL_LINEAR,
    seq_len: int = 512,
    batch_size: int = 8,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    buckets: int = 1,
    pack: bool = False,
    accumulate: str = "float32",
    text_field: str = "text",
    split: str | None = None,
    data_config: str | None = None,
    shuffle_seed: int | None = None,
    sample_max_norm: bool = False,
    image_size: int | None = None,
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    prompt: str | None = None,
    noise_timestep: int | None = None,
    t5_tokens: int | None = None,
    seed: int = 0,
    shard: str | None = None,
    checkpoint_every: int | None = None,
    offload: bool = False,
    max_memory: str | None = None,
    stats_device: str | None = None,
    layerwise: bool = False,
    activations_device: str | None = None,
    gradients: bool = False,
    gradients_only: bool = False,
    gradient_checkpointing: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Path:
    """Capture input statistics of `targets` in `model` over `data`; write a store at `out`.

    `model` is a transformers directory (text or vision) or a diffusers pipeline directory (SD, SDXL,
    Flux, SD3: `t5_tokens` sets the length of the latter two's T5 prompts), or a Hugging Face Hub id (at `revision`) whose snapshot is in the cache or
    can be downloaded; `data` is text for a text model (records/: a file, a folder, a dataset, a Hub
    dataset id; its `data_config` and `split`, the `text_field`, the first `max_samples` or as many drawn with
    `shuffle_seed`), a folder of images otherwise. `shard`
    ('i/N') captures only share i of N of every bucket; `merge` of all N equals one run. With
    `checkpoint_every`, the sums are saved every N batches (N blocks with `layerwise`, on the way down
    with `gradients` too) and on
    SIGINT/SIGTERM, and a restart with the same arguments resumes from them. Under `torchrun`,
    every process captures its own share and rank 0 writes the summed store. `offload` spreads a
    model too large for the device over device, CPU memory and disk (accelerate; limits in
    `max_memory`, 'cuda=20GiB,cpu=64GiB'); `stats_device` ('cpu') keeps the sums off the device.
    `layerwise` reads and runs one block at a time, holding one block's weights and statistics
    and every batch's hidden states (on `activations_device`). None of these changes the statistics.
    `gradients` also sums each target weight's gradient of the training loss, in the same pass: a
    causal LM's next-token loss, or a pipeline's denoising loss (its latents then noised as training
    does, at random timesteps, for the statistics too); `gradients_only` sums the gradients and no
    statistics (LoRA-GA and LoRA-One read nothing else); `gradient_checkpointing` recomputes each
    block's activations in backward instead of keeping them."""
    args = SimpleNamespace(**locals())  # capture's arguments, as the steps below read them
    with distributed.joined() as world, contextlib.ExitStack() as scratch:
        return _capture(world, scratch, args)


def _capture(world: distributed.World, scratch: contextlib.ExitStack, a: SimpleNamespace) -> Path:
    a.gradients = a.gradients or a.gradients_only
    _check_arguments(a, world)
    a.model = locate(a.model, a.revision, a.trust_remote_code)
    share = (world.rank, world.size) if world.size > 1 else parse_shard(a.shard)
    if not world.leader:
        console.quiet = True  # one progress bar and log, rank 0's
    dev = resolve_device(a.device)
    sums_on = resolve_device(a.stats_device, "--stats-device") if a.stats_device is not None else dev
    activations_on = resolve_device(a.activations_device, "--activations-device") if a.activations_device is not None else dev
    started = time.perf_counter()
    placement = offload_placement(scratch, a.out, a.offload, a.max_memory, dev, _offload_dtype(a.dtype, dev))
    net, tokenizer = loading.load(a.model, a.trust_remote_code, placement, empty=a.layerwise)
    kind = loading.modality(net)
    _check_model(net, kind, a)
    modules = linears.select_targets(net, a.targets)
    root = net if a.gradients and a.layerwise else linears.forward_root(net, list(modules))  # the loss needs the output layer
    if a.layerwise:
        prefix, path = chain(net, root, modules)  # refuses, before any work, a model without one chain of blocks
        if a.gradients:
            check_gradient_targets(modules, prefix, path)
    weights = named_weights.Weights(Path(a.model), net) if a.layerwise else None
    checkpoint_dtype = named_weights.load_dtype(net, weights) if a.layerwise else net.dtype
    model_fingerprint = fingerprints.fingerprint(modules, weights.matrix if a.layerwise else None, checkpoint_dtype, model_dir=Path(a.model))
    store.check_out(a.out, model_fingerprint, a.overwrite)
    run_dtype = net.dtype if placement is not None else resolve_dtype(a.dtype, checkpoint_dtype, dev)
    feed = feeds.build(kind, net, tokenizer, a, run_dtype, share)
    if a.gradients and feed.unpredicted == feed.total:
        raise _nothing_to_predict(a.data, feed.settings["seq_len"])
    where = _placed(net, a.layerwise, placement, dev, run_dtype)
    log(f"loaded {type(net).__name__} from {a.model} ({len(modules)} targets, {run_dtype}, {where}) in {time.perf_counter() - started:.1f}s")
    recorded = _settings(a, run_dtype, dev, feed)
    saved = checkpoint.location(a.out, world.rank if world.size > 1 else None) if a.checkpoint_every else None
    ident = checkpoint.identity(model_fingerprint, feed.data, recorded, share, *(["layerwise"] if a.layerwise else []))
    # layerwise, each block's gradient sums are made and written in its turn: this one counts batches, tokens and loss
    grads = GradientSums({} if a.layerwise else modules, ACCUMULATE[a.accumulate], sums_on) if a.gradients else None
    if a.layerwise:
        setup = layerwise.Setup(dev, run_dtype, weights, checkpoint_dtype, a.buckets, ACCUMULATE[a.accumulate], a.sample_max_norm,
                                sums_on, activations_on, _layerwise_work(scratch, a.out, saved), saved, a.checkpoint_every, ident,
                                summed=not a.gradients_only)
        payloads, written, done = layerwise.capture(net, root, modules, feed, setup, world, grads)
        module_map = {name: written.modules[name] for name in modules}
        stats = {key: written.stats[key] for key in dict.fromkeys(entry["key"] for entry in module_map.values())}
        sums = {}
    else:
        blocks = chain_of_blocks(net, root, modules) if a.gradient_checkpointing else None
        sums, module_map, done = stream.stream(root, modules, feed, net, a.buckets, ACCUMULATE[a.accumulate], dev, a.sample_max_norm,
                                               sums_on, saved, ident, a.checkpoint_every, grads, blocks, summed=not a.gradients_only)
        payloads = stats = None
    if world.size > 1:
        done, feed.data["sequences"] = distributed.add_across_ranks(world, sums, [done, feed.total], grads)
        if not world.leader:
            if saved is not None:
                checkpoint.remove(saved)
            return Path(a.out)
    if grads is not None and grads.tokens == 0:
        raise _nothing_to_predict(a.data, recorded["seq_len"])
    if grads is not None and feed.unpredicted:
        warn(f"{feed.unpredicted} of {feed.total} samples have no token to predict (a single token, or a prompt that fills --seq-len "
             f"{recorded['seq_len']}): they add statistics but no gradient")
    stats = stats if stats is not None else _summed(sums, module_map)
    tokens = done if kind in TOKENS else max(entry["count"] for entry in stats.values())
    manifest = store.new_manifest(model=loading.record(net, a.model, model_fingerprint), data=feed.data | {"tokens": tokens},
                                  capture=recorded, modules=module_map, stats=stats, gradients=grads.record() if a.gradients else None)
    with atomic_directory(a.out) as tmp:
        if payloads is None:
            payloads = store.Payloads(tmp)
            for key, s in sums.items():  # one key's full matrices at a time on the CPU; gradients beside their key's statistics (or alone)
                readers = [name for name, entry in module_map.items() if entry["key"] == key] if a.gradients else []
                payloads.add(key, s.tensors(key) | {n: t for name in readers for n, t in grads.tensors(name).items()})
        payloads.finish(manifest, into=tmp)
    if saved is not None:
        checkpoint.remove(saved)
    log(f"captured {tokens:,} {'tokens' if kind in TOKENS else 'rows'} from {feed.total:,} samples into {len(stats)} statistics "
        f"({time.perf_counter() - started:.1f}s)")
    return Path(a.out)


def _check_arguments(a: SimpleNamespace, world: distributed.World) -> None:
    """Options that are out of range or do not go together, refused before anything loads."""
    check_name(Path(a.out))
    for option, value in (("--seq-len", a.seq_len), ("--batch-size", a.batch_size), ("--buckets", a.buckets)):
        if value < 1:
            raise CntinitError(f"{option} must be at least 1, got {value}")
    if a.checkpoint_every is not None and a.checkpoint_every < 1:
        raise CntinitError(f"--checkpoint-every must be at least 1, got {a.checkpoint_every}")
    if a.max_samples is not None and a.max_samples < 1:
        raise CntinitError(f"--max-samples must be at least 1, got {a.max_samples}")
    if a.image_size is not None and a.image_size < 1:
        raise CntinitError(f"--image-size must be at least 1, got {a.image_size}")
    if a.accumulate not in ACCUMULATE:
        raise not_one_of("--accumulate", a.accumulate, ACCUMULATE)
    for option, value in (("--seed", a.seed), ("--shuffle-seed", a.shuffle_seed)):
        if value is not None and not SEEDS[0] <= value <= SEEDS[1]:
            raise CntinitError(f"{option} must be an integer from {SEEDS[0]} to {SEEDS[1]}, got {value}")
    if not all(math.isfinite(v) and abs(v) <= 1e6 for v in a.image_mean) or not all(1e-6 <= v <= 1e6 for v in a.image_std):
        raise CntinitError(f"--image-mean must be finite, within ±1e6, and --image-std from 1e-6 to 1e6 (pixels in [0, 1] are divided by "
                           f"it); got {a.image_mean} and {a.image_std}")
    if world.size > 1 and a.shard is not None:
        raise CntinitError("under torchrun every process already captures its own share: leave out --shard")
    if a.layerwise and a.offload:
        raise CntinitError("--layerwise already reads one block at a time from the checkpoint: leave out --offload")
    if a.activations_device is not None and not a.layerwise:
        raise CntinitError("--activations-device says where --layerwise keeps the hidden states between blocks: add --layerwise")
    if a.gradient_checkpointing and not a.gradients:
        raise CntinitError("--gradient-checkpointing saves memory in the backward pass of --gradients: add --gradients")
    if a.gradients and a.offload:
        raise CntinitError("--gradients runs backward through the whole model on one device; --offload keeps only part of it there: "
                           "use --layerwise, which runs backward block by block")
    if a.gradients and a.layerwise and a.gradient_checkpointing:
        raise CntinitError("--gradients --layerwise recomputes each block in backward already: leave out --gradient-checkpointing")


def _nothing_to_predict(data, seq_len: int) -> CntinitError:
    return CntinitError(f"no sample of {data} has a token to predict (each is a single token, or its prompt fills --seq-len {seq_len}): "
                        "give longer text or a larger --seq-len")


def _check_model(net, kind: str, a: SimpleNamespace) -> None:
    """Options the loaded model cannot take: another kind's, or a way of running it its structure does not allow."""
    feeds.refuse_foreign_options(kind, a, a.model)
    if a.layerwise and kind == "vlm":
        raise CntinitError(f"--layerwise runs one chain of repeated blocks, and {a.model} is a vision-language model with two (the "
                           "vision tower's, the language model's): use --offload for a model larger than the device")
    if a.layerwise and (kind == "diffusion" or getattr(net.config, "is_encoder_decoder", False)):
        what = f"a diffusers pipeline, whose {_denoiser_words(net)}" if kind == "diffusion" else "an encoder-decoder model, whose decoder is"
        raise CntinitError(f"--layerwise runs one chain of repeated blocks; {a.model} is {what} not one: capture without --layerwise")
    if a.gradients:
        gradients.check_model(net, kind, a.model)
    if a.gradient_checkpointing and kind == "diffusion":
        raise CntinitError(f"--gradient-checkpointing recomputes one chain of repeated blocks, and a diffusers pipeline's {_denoiser_words(net)} "
                           "not one: leave it out (a smaller --batch-size saves memory)")


def _denoiser_words(net) -> str:
    """What of a pipeline is not one chain of blocks, for the refusals above."""
    return "UNet is" if net.family.denoiser == "unet" else "text encoders and transformer are"


def _placed(net, layerwise_run: bool, placement, dev: torch.device, run_dtype: torch.dtype) -> str:
    """Put the model where it runs (unless --layerwise or --offload place it); where that is, in words."""
    if layerwise_run:
        return f"{dev}, weights read block by block"
    if placement is None:
        place(net, dev, run_dtype)
        return str(dev)
    places = getattr(net, "hf_device_map", {"": dev}).values()  # GPUs by index, then "cpu", "disk"
    spread = list(dict.fromkeys(f"cuda:{v}" if isinstance(v, int) else str(v) for v in places))
    return f"{dev}, weights on {' + '.join(spread)}"


def _settings(a: SimpleNamespace, run_dtype: torch.dtype, dev: torch.device, feed: feeds.Feed) -> dict:
    """The store manifest's capture section: every setting that shapes the statistics."""
    return {
        "targets": a.targets if isinstance(a.targets, str) else ",".join(a.targets),
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "max_samples": a.max_samples,
        "pack": a.pack,
        "buckets": a.buckets,
        "dtype": str(run_dtype).removeprefix("torch."),
        "accumulate": a.accumulate,
        "sample_max_norm": a.sample_max_norm,
        "device": str(dev),
        "shard": a.shard,
    } | feed.settings | ({"gradients": True} if a.gradients else {}) | ({"statistics": False} if a.gradients_only else {})


def _layerwise_work(scratch: contextlib.ExitStack, out, saved: Path | None) -> Path:
    """Where a layerwise capture writes each block's payload files until the store is written: the
    checkpoint, with one (the finished blocks' payloads wait there), else a temporary folder beside `out`."""
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if saved is not None:
        saved.mkdir(exist_ok=True)
    return saved or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.layerwise-", dir=parent)))


def _summed(sums: dict, module_map: dict) -> dict:
    """The manifest's statistics records of a whole-model capture, every target seen to run."""
    silent = [name for name, entry in module_map.items() if sum(sums[entry["key"]].count) == 0]
    if silent:
        raise CntinitError(f"targets never ran in the forward pass: {', '.join(silent[:5])}: drop them from --targets")
    return {key: {"dim": s.dim, "count": sum(s.count), "modules": [n for n, e in module_map.items() if e["key"] == key]}
            for key, s in sums.items()}
