"""The capture stage: stream calibration data (text, images, images with prompts) through a model
and sum each target's input statistics.

Hooks sit on the first module of every group that reads one tensor (q/k/v, gate/up), so a
shared input is summed once. Padding is dropped before the Gram update, so batching never
changes the result beyond float rounding.
"""

from __future__ import annotations

import contextlib
import math
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
from rich.progress import TextColumn
from torch import nn

from . import checkpoint, console, distributed, feeds, fingerprints, models, named_weights, store
from . import gradients as gradients_mod
from . import layerwise as layerwise_mod
from .atomic import atomic_directory
from .console import log, progress, warn
from .errors import CntinitError, not_one_of
from .stats import InputStats

ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
FINITE_CHECK_EVERY = 8  # batches between NaN/Inf checks (each one syncs the device); also checked at the end


@contextlib.contextmanager
def exact_float32():
    """TF32 off: Σxxᵀ in TF32 keeps only 10 mantissa bits."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def shared_input_groups(modules: dict[str, nn.Module], run, ran: set | None = None) -> list[list[str]]:
    """Group target modules that read the very same tensor when `run()` forwards a small input.

    Every target's input is kept alive until the grouping is done, so equal (data_ptr, shape,
    stride, version) means the same tensor. A target that does not run is a group of its own
    (`ran`, when given, receives the names of those that did).
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        def record(mod, args, kwargs, name=name):
            seen.setdefault(name, args[0] if args else next(iter(kwargs.values())))
        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():  # not inference_mode: it hides the version counters used below
            run()
    finally:
        for handle in handles:
            handle.remove()
    if ran is not None:
        ran.update(seen)
    groups: dict[tuple, list[str]] = {}
    for name in modules:
        x = seen.get(name)
        identity = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version) if x is not None else name
        groups.setdefault(identity, []).append(name)
    return list(groups.values())


class Interrupted(CntinitError):
    """SIGINT/SIGTERM during a checkpointed capture: the sums so far are saved; exit 130."""

    label, exit_code = "interrupted", 130


@contextlib.contextmanager
def _stop_requests(active: bool):
    """While `active`, SIGINT and SIGTERM (what Slurm sends before killing a job) only set a flag
    (the list holds the signal's name) that the capture loop reads after each batch."""
    requested: list[str] = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: requested.append(signal.Signals(number).name))
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Batch:
    """Where the real tokens of the current batch are, for dropping padding in hooks."""

    size = 0
    length = 0  # tokens per padded sequence; 0 for inputs without padding
    index: torch.Tensor | None = None  # flat indices of real tokens; None when unpadded
    bucket = 0


def _real_rows(x: torch.Tensor, batch: _Batch, samples: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the rows of real tokens, with `samples` the sequence each row belongs to — None when unknown)."""
    dim = x.shape[-1]
    if batch.length == 0 and x.dim() == 3 and x.shape[0] == batch.size:  # no padding (images): every row counts
        rows = x.reshape(-1, dim)
        return rows, torch.arange(batch.size, device=rows.device).repeat_interleave(x.shape[1]) if samples else None
    if x.dim() == 3 and x.shape[:2] == (batch.size, batch.length):
        flat = x.reshape(-1, dim)
    elif x.dim() == 2 and x.shape[0] == batch.size * batch.length and batch.length > 1:
        flat = x
    else:  # one row per sequence (a pooler) or a layout without padding
        rows = x.reshape(-1, dim)
        known = samples and rows.shape[0] == batch.size
        return rows, torch.arange(batch.size, device=rows.device) if known else None
    rows = flat if batch.index is None else flat.index_select(0, batch.index.to(flat.device))
    if not samples:
        return rows, None
    return rows, (torch.arange(flat.shape[0], device=flat.device) if batch.index is None else batch.index.to(flat.device)) // batch.length


def _per_sample_max_norm(rows: torch.Tensor, samples: torch.Tensor | None, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Each sequence's rows divided by |its largest entry| — `input / torch.max(input).abs()`, as
    PEFT's CorDA preprocessing does per sample (max, not max-abs); rows of unknown origin as one sample."""
    rows = rows.to(dtype)
    if samples is None:
        samples = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
    peak = torch.full((size,), -torch.inf, dtype=dtype, device=rows.device).scatter_reduce(0, samples, rows.amax(dim=1), "amax")
    scale = peak.abs()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return rows / scale[samples, None]


class Recorder:
    """Forward hooks that sum each unique input's statistics while batches run through the model.

    `groups` lists the targets that read one tensor (`shared_input_groups`); the first of each
    names the statistic. Use as a context manager (hooks are installed inside it), calling `run`
    per batch to forward it through `root`, or `begin` before forwarding a batch some other way.
    """

    def __init__(self, modules: dict[str, nn.Module], groups: list[list[str]], buckets: int, accumulate_dtype: torch.dtype,
                 device: torch.device, sample_max_norm: bool = False, stats_device: torch.device | None = None,
                 root: nn.Module | None = None):
        self.root, self.modules, self.device = root, modules, device
        self.sample_max_norm, self.accumulate_dtype = sample_max_norm, accumulate_dtype
        self.batch = _Batch()
        self.stats: dict[str, InputStats] = {}
        self.module_map: dict[str, dict] = {}
        for group in groups:
            key = group[0]
            self.stats[key] = InputStats(models.in_out_features(modules[key])[0], buckets, accumulate_dtype, stats_device or device)
            for name in group:
                d_in, d_out = models.in_out_features(modules[name])
                self.module_map[name] = {"key": key, "in_features": d_in, "out_features": d_out, "layer": type(modules[name]).__name__}
        self.handles: list = []
        self.batches = 0
        self.paused = False  # while a checkpointed forward runs again during backward: its inputs are counted already

    def __enter__(self) -> "Recorder":
        for key, stats in self.stats.items():
            def hook(mod, args, kwargs, stats=stats):
                if self.paused:
                    return
                x = (args[0] if args else next(iter(kwargs.values()))).detach()
                rows, samples = _real_rows(x, self.batch, samples=self.sample_max_norm)
                if self.sample_max_norm:
                    rows = _per_sample_max_norm(rows, samples, self.batch.size, self.accumulate_dtype)
                stats.add(rows.to(stats.sum.device), self.batch.bucket)

            self.handles.append(self.modules[key].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def begin(self, size: int, mask: torch.Tensor | None, bucket: int) -> int:
        """Say where the real tokens of the next batch are (`mask`: which positions of right-padded
        sequences are real; None when nothing is padding); returns its real token count, or its
        sample count without a mask."""
        batch = self.batch
        batch.size, batch.bucket = size, bucket
        batch.length = 0 if mask is None else mask.shape[1]
        flat_mask = None if mask is None else mask.flatten()
        batch.index = None if flat_mask is None or bool(flat_mask.all()) else flat_mask.nonzero().squeeze(1).to(self.device)
        return size if flat_mask is None else int(flat_mask.sum())

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def run(self, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None, bucket: int, forward=None) -> int:
        """Forward one batch through `root` (or `forward`) into bucket `bucket`; returns what `begin` does."""
        count = self.begin(next(iter(inputs.values())).shape[0], mask, bucket)
        (forward or self.root)(**{name: value.to(self.device) for name, value in inputs.items()})
        if self.batches % FINITE_CHECK_EVERY == 0:
            self.check_finite()
        self.batches += 1
        return count

    def check_finite(self) -> None:
        """One device sync: NaN/Inf in any input shows up in its running Σx, and a square beyond the
        sums' range on the diagonal of Σxxᵀ (which bounds every other entry)."""
        keys = list(self.stats)
        if not keys:
            return
        totals = torch.stack([self.stats[key].sum.sum() + self.stats[key].xxt.diagonal(dim1=-2, dim2=-1).sum() for key in keys])
        if bool(torch.isfinite(totals).all()):
            return
        bad_key = keys[int((~torch.isfinite(totals)).nonzero()[0])]
        names = [n for n, e in self.module_map.items() if e["key"] == bad_key]
        raise CntinitError(f"non-finite activations (NaN/Inf, or squares beyond the sums' range) entering {', '.join(names)}: "
                           "run with --dtype float32, or --accumulate float64 for activations this large")


def _offload_dtype(dtype: str, dev: torch.device) -> torch.dtype | str:
    """The dtype accelerate loads an offloaded model in: as resolve_dtype, the checkpoint's on GPU."""
    if dtype == "auto":
        return "auto" if dev.type == "cuda" else torch.float32
    return models.resolve_dtype(dtype, None, dev)


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
    targets: str | list[str] = models.ALL_LINEAR,
    seq_len: int = 512,
    batch_size: int = 8,
    max_samples: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    buckets: int = 1,
    pack: bool = False,
    accumulate: str = "float32",
    text_field: str = "text",
    sample_max_norm: bool = False,
    image_size: int | None = None,
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    prompt: str | None = None,
    noise_timestep: int | None = None,
    seed: int = 0,
    shard: str | None = None,
    checkpoint_every: int | None = None,
    offload: bool = False,
    max_memory: str | None = None,
    stats_device: str | None = None,
    layerwise: bool = False,
    activations_device: str | None = None,
    gradients: bool = False,
    gradient_checkpointing: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Capture input statistics of `targets` in `model` over `data`; write a store at `out`.

    `model` is a transformers directory (text or vision) or a diffusers Stable-Diffusion-style
    pipeline directory; `data` is text for a text model, a folder of images otherwise. `shard`
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
    does, at random timesteps, for the statistics too); `gradient_checkpointing` recomputes each
    block's activations in backward instead of keeping them."""
    arguments = dict(locals())
    with distributed.joined() as world, contextlib.ExitStack() as scratch:
        return _capture(world, scratch, **arguments)


def _capture(world: distributed.World, scratch: contextlib.ExitStack, model, data, out, *, targets, seq_len, batch_size, max_samples, device, dtype, buckets,
             pack, accumulate, text_field, sample_max_norm, image_size, image_mean, image_std, prompt, noise_timestep, seed,
             shard, checkpoint_every, offload, max_memory, stats_device, layerwise, activations_device, gradients, gradient_checkpointing,
             overwrite, trust_remote_code) -> Path:
    for option, value in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--buckets", buckets)):
        if value < 1:
            raise CntinitError(f"{option} must be at least 1, got {value}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CntinitError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if max_samples is not None and max_samples < 1:
        raise CntinitError(f"--max-samples must be at least 1, got {max_samples}")
    if image_size is not None and image_size < 1:
        raise CntinitError(f"--image-size must be at least 1, got {image_size}")
    if accumulate not in ACCUMULATE:
        raise not_one_of("--accumulate", accumulate, ACCUMULATE)
    if not all(math.isfinite(v) for v in (*image_mean, *image_std)) or min(image_std) <= 0:
        raise CntinitError(f"--image-mean and --image-std must be finite, --image-std above 0; got {image_mean} and {image_std}")
    if world.size > 1 and shard is not None:
        raise CntinitError("under torchrun every process already captures its own share: leave out --shard")
    if layerwise and offload:
        raise CntinitError("--layerwise already reads one block at a time from the checkpoint: leave out --offload")
    if activations_device is not None and not layerwise:
        raise CntinitError("--activations-device says where --layerwise keeps the hidden states between blocks: add --layerwise")
    if gradient_checkpointing and not gradients:
        raise CntinitError("--gradient-checkpointing saves memory in the backward pass of --gradients: add --gradients")
    if gradients and offload:
        raise CntinitError("--gradients runs backward through the whole model on one device; --offload keeps only part of it there: "
                           "use --layerwise, which runs backward block by block")
    if gradients and layerwise:
        if gradient_checkpointing:
            raise CntinitError("--gradients --layerwise recomputes each block in backward already: leave out --gradient-checkpointing")
    share = (world.rank, world.size) if world.size > 1 else parse_shard(shard)
    if not world.leader:
        console.quiet = True  # one progress bar and log, rank 0's
    dev = models.resolve_device(device)
    sums_on = models.resolve_device(stats_device, "--stats-device") if stats_device is not None else dev
    activations_on = models.resolve_device(activations_device, "--activations-device") if activations_device is not None else dev
    started = time.perf_counter()
    placement = models.offload_placement(scratch, out, offload, max_memory, dev, _offload_dtype(dtype, dev))
    net, tokenizer = models.load(model, trust_remote_code, placement, empty=layerwise)
    kind = models.modality(net)
    wrong = [option for option, value, kinds in (
        ("--prompt", prompt, ("diffusion",)), ("--noise-timestep", noise_timestep, ("diffusion",)),
        ("--image-size", image_size, ("vision", "diffusion")), ("--pack", pack or None, ("text",)),
        ("--sample-max-norm", sample_max_norm or None, ("text", "vision"))) if value is not None and kind not in kinds]
    if wrong:
        raise CntinitError(f"{wrong[0]} does not apply to a {kind} model ({model}): leave it out")
    if layerwise and (kind == "diffusion" or getattr(net.config, "is_encoder_decoder", False)):
        what = "a diffusers pipeline, whose UNet" if kind == "diffusion" else "an encoder-decoder model, whose decoder"
        raise CntinitError(f"--layerwise runs one chain of repeated blocks; {model} is {what} is not one: capture without --layerwise")
    if gradients:
        gradients_mod.check_model(net, kind, model)
    if gradient_checkpointing and kind == "diffusion":
        raise CntinitError("--gradient-checkpointing recomputes one chain of repeated blocks, and a diffusers pipeline's UNet is not "
                           "one: leave it out (a smaller --batch-size saves memory)")
    modules = models.select_targets(net, targets)
    root = net if gradients and layerwise else models.forward_root(net, list(modules))  # the loss needs the output layer
    if layerwise:
        prefix, path = layerwise_mod.chain(net, root, modules)  # refuses, before any work, a model without one chain of blocks
        if gradients:
            layerwise_mod.check_gradient_targets(modules, prefix, path)
    weights = named_weights.Weights(Path(model), net) if layerwise else None
    checkpoint_dtype = named_weights.load_dtype(net, weights) if layerwise else net.dtype
    model_fingerprint = fingerprints.fingerprint(modules, weights.matrix if layerwise else None, checkpoint_dtype)
    store.check_out(out, model_fingerprint, overwrite)
    run_dtype = net.dtype if placement is not None else models.resolve_dtype(dtype, checkpoint_dtype, dev)
    if kind == "text":
        feed = feeds.text(net, tokenizer, data, seq_len=seq_len, batch_size=batch_size, buckets=buckets,
                          max_samples=max_samples, pack=pack, text_field=text_field, shard=share)
    elif kind == "vision":
        feed = feeds.vision(net, model, data, batch_size=batch_size, buckets=buckets, max_samples=max_samples,
                            dtype=run_dtype, image_size=image_size, image_mean=image_mean, image_std=image_std, shard=share)
    else:
        feed = feeds.diffusion(net, tokenizer, data, batch_size=batch_size, buckets=buckets, max_samples=max_samples,
                               image_size=image_size, prompt=prompt, noise_timestep=noise_timestep, seed=seed, shard=share)
    if layerwise:
        where = f"{dev}, weights read block by block"
    elif placement is None:
        models.place(net, dev, run_dtype)
        where = str(dev)
    else:
        places = getattr(net, "hf_device_map", {"": dev}).values()  # GPUs by index, then "cpu", "disk"
        spread = list(dict.fromkeys(f"cuda:{v}" if isinstance(v, int) else str(v) for v in places))
        where = f"{dev}, weights on {' + '.join(spread)}"
    log(f"loaded {type(net).__name__} from {model} ({len(modules)} targets, {run_dtype}, {where}) in {time.perf_counter() - started:.1f}s")
    recorded = {
        "targets": targets if isinstance(targets, str) else ",".join(targets),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "pack": pack,
        "buckets": buckets,
        "dtype": str(run_dtype).removeprefix("torch."),
        "accumulate": accumulate,
        "sample_max_norm": sample_max_norm,
        "device": str(dev),
        "shard": shard,
    } | feed.settings | ({"gradients": True} if gradients else {})
    saved = checkpoint.location(out, world.rank if world.size > 1 else None) if checkpoint_every else None
    ident = checkpoint.identity(model_fingerprint, feed.data, recorded, share, *(["layerwise"] if layerwise else []))
    # layerwise, each block's gradient sums are made and written in its turn: this one counts batches, tokens and loss
    grads = gradients_mod.GradientSums({} if layerwise else modules, ACCUMULATE[accumulate], sums_on) if gradients else None
    if layerwise:
        parent = Path(out).absolute().parent
        parent.mkdir(parents=True, exist_ok=True)
        if saved is not None:
            saved.mkdir(exist_ok=True)  # the finished blocks' payloads wait in the checkpoint
        work = saved or Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.layerwise-", dir=parent)))
        setup = layerwise_mod.Setup(dev, run_dtype, weights, checkpoint_dtype, buckets, ACCUMULATE[accumulate], sample_max_norm,
                                    sums_on, activations_on, work, saved, checkpoint_every, ident)
        payloads, written, done = layerwise_mod.capture(net, root, modules, feed, setup, world, grads)
        module_map = {name: written.modules[name] for name in modules}
        stats = {key: written.stats[key] for key in dict.fromkeys(entry["key"] for entry in module_map.values())}
        sums = {}
    else:
        payloads = None
        blocks = _blocks(net, root, modules) if gradient_checkpointing else None
        sums, module_map, done = _stream(root, modules, feed, net, buckets, accumulate, dev, sample_max_norm, sums_on, saved, ident,
                                         checkpoint_every, grads, blocks)
    if world.size > 1:
        done, feed.data["sequences"] = distributed.add_across_ranks(world, sums, [done, feed.total], grads)
        if not world.leader:
            if saved is not None:
                checkpoint.remove(saved)
            return Path(out)
    if grads is not None and grads.tokens == 0:
        raise CntinitError(f"no sample of {data} has a second token, so no next token was predicted and no gradient taken: give longer text")
    if not layerwise:
        silent = [name for name, entry in module_map.items() if sum(sums[entry["key"]].count) == 0]
        if silent:
            raise CntinitError(f"targets never ran in the forward pass: {', '.join(silent[:5])}: drop them from --targets")
        stats = {key: {"dim": s.dim, "count": sum(s.count), "modules": [n for n, e in module_map.items() if e["key"] == key]}
                 for key, s in sums.items()}
    tokens = done if kind == "text" else max(entry["count"] for entry in stats.values())
    manifest = store.new_manifest(
        model=models.record(net, model, model_fingerprint),
        data=feed.data | {"tokens": tokens},
        capture=recorded,
        modules=module_map,
        stats=stats,
        gradients=grads.record() if gradients else None,
    )
    with atomic_directory(out) as tmp:
        if payloads is None:
            payloads = store.Payloads(tmp)
            for key, s in sums.items():  # one key's full matrices at a time on the CPU; gradients beside their key's statistics
                readers = [name for name, entry in module_map.items() if entry["key"] == key] if gradients else []
                payloads.add(key, s.tensors(key) | {n: t for name in readers for n, t in grads.tensors(name).items()})
        payloads.finish(manifest, into=tmp)
    if saved is not None:
        checkpoint.remove(saved)
    log(f"captured {tokens:,} {'tokens' if kind == 'text' else 'rows'} from {feed.total:,} samples into {len(stats)} statistics "
        f"({time.perf_counter() - started:.1f}s)")
    return Path(out)


clock = time.perf_counter  # of the progress bar's rate


def _blocks(net, root, modules) -> nn.ModuleList:
    """The model's chain of repeated blocks, which --gradient-checkpointing recomputes one at a time."""
    prefix, path = layerwise_mod.chain(net, root, modules)
    return net.get_submodule(prefix + path)


def _stream(root, modules, feed, net, buckets, accumulate, dev, sample_max_norm, sums_on, saved, ident, checkpoint_every,
            grads: gradients_mod.GradientSums | None = None, blocks: nn.ModuleList | None = None):
    """The whole model over every batch, hooks on every target: (sums by key, module map, real tokens or samples).
    With `grads`, each batch also runs backward from the next-token loss into those sums (`blocks` checkpointed)."""
    probe = {name: value.to(dev) for name, value in feed.probe.items()}
    groups = shared_input_groups(modules, lambda: root(**probe))
    recorder = Recorder(modules, groups, buckets, ACCUMULATE[accumulate], dev, sample_max_norm, sums_on, root)
    resumed = checkpoint.load(saved, ident) if saved is not None and saved.exists() else None
    if resumed and not (all(stats.fits(resumed[1], key) for key, stats in recorder.stats.items())
                        and (grads is None or grads.fits(resumed[1]))):
        warn(f"the checkpoint at {saved} is damaged (its sums do not fit this capture): starting from the beginning")
        resumed = None
    skip, done = (resumed[0]["batches"], resumed[0]["done"]) if resumed else (0, 0)
    resumed_done = done
    if resumed:
        for key, stats in recorder.stats.items():
            stats.restore(resumed[1], key)
        if grads is not None:
            grads.restore(resumed[1])
        log(f"resuming from the checkpoint at {saved}: {skip} batches already summed")
    rate = TextColumn("{task.fields[rate]}")
    targets = None  # the current batch's next-token targets

    def forward_and_backward(**inputs):
        grads.step(net, inputs, inputs.get("attention_mask"), targets, recorder.pause)

    forward = forward_and_backward if grads is not None else None
    no_autograd = torch.inference_mode() if grads is None else torch.no_grad()  # inference tensors cannot enter backward
    taking = grads.taking(net) if grads is not None else contextlib.nullcontext()
    remembering = gradients_mod.checkpointed_blocks(blocks) if blocks is not None else contextlib.nullcontext()
    with recorder, exact_float32(), no_autograd, taking, remembering, progress(rate) as bar, _stop_requests(saved is not None) as stop:
        task = bar.add_task("capture", total=feed.total, rate="")
        for index, (bucket, inputs, mask, targets) in enumerate(feed.batches()):
            size = next(iter(inputs.values())).shape[0]
            if index < skip:
                bar.update(task, advance=size)
                continue
            if index == skip:
                begun = clock()  # the rate counts this run's work, not the checkpoint's
                if resumed and "rng" in resumed[1]:
                    net.generator.set_state(resumed[1]["rng"])  # the noise continues where the checkpoint left it
            done += recorder.run(inputs, mask, bucket, forward)
            bar.update(task, advance=size, rate=f"{(done - resumed_done) / max(clock() - begun, 1e-9):,.1f} {feed.unit}/s")
            if saved is not None and ((index + 1) % checkpoint_every == 0 or stop):
                recorder.check_finite()
                rng = net.generator.get_state() if getattr(net, "generator", None) is not None else None
                held = {n: t for k, st in recorder.stats.items() for n, t in st.state(k).items()}
                if grads is not None:
                    grads.check_finite()
                    held |= grads.state()
                checkpoint.save(saved, ident, index + 1, done, held, rng)
            if stop:
                raise Interrupted(f"stopped by {stop[0]} after {index + 1} batches; the checkpoint at {saved} keeps them: "
                                  "run the same command to resume")
        recorder.check_finite()
        if grads is not None:
            grads.check_finite()
    return recorder.stats, recorder.module_map, done
