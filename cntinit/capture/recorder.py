"""The recorder: forward hooks that sum each target's input statistics while batches run, as the
whole-model loop (stream.py) and the block-by-block one (layerwise.py) both use it.

Hooks sit on the first module of every group that reads one tensor (q/k/v, gate/up), so a
shared input is summed once. Padding is dropped before the Gram update, so batching never
changes the result beyond float rounding.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import CntinitError
from ..models.linears import in_out_features
from .stats import InputStats

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
    names the statistic. Not `summed` (--gradients-only), the hooks count each input's rows alone.
    Use as a context manager (hooks are installed inside it), calling `run` per batch to forward it
    through `root`, or `begin` before forwarding a batch some other way.
    """

    def __init__(self, modules: dict[str, nn.Module], groups: list[list[str]], buckets: int, accumulate_dtype: torch.dtype,
                 device: torch.device, sample_max_norm: bool = False, stats_device: torch.device | None = None,
                 root: nn.Module | None = None, unpadded=None, summed: bool = True):
        self.root, self.modules, self.device = root, modules, device
        self.sample_max_norm, self.accumulate_dtype = sample_max_norm, accumulate_dtype
        self.batch = _Batch()
        self.whole = _Batch()  # for targets whose every input row is real (`unpadded(name)`: a VLM's image patches)
        self.unpadded = {group[0] for group in groups if unpadded is not None and unpadded(group[0])}
        self.stats: dict[str, InputStats] = {}
        self.module_map: dict[str, dict] = {}
        for group in groups:
            key = group[0]
            self.stats[key] = InputStats(in_out_features(modules[key])[0], buckets, accumulate_dtype, stats_device or device, summed)
            for name in group:
                d_in, d_out = in_out_features(modules[name])
                self.module_map[name] = {"key": key, "in_features": d_in, "out_features": d_out, "layer": type(modules[name]).__name__}
        self.handles: list = []
        self.batches = 0
        self.paused = False  # while a checkpointed forward runs again during backward: its inputs are counted already

    def __enter__(self) -> "Recorder":
        for key, stats in self.stats.items():
            def hook(mod, args, kwargs, stats=stats, key=key):
                if self.paused:
                    return
                x = (args[0] if args else next(iter(kwargs.values()))).detach()
                rows, samples = _real_rows(x, self.whole if key in self.unpadded else self.batch, samples=self.sample_max_norm)
                if self.sample_max_norm:
                    rows = _per_sample_max_norm(rows, samples, self.batch.size, self.accumulate_dtype)
                stats.add(rows.to(stats.sum.device) if stats.summed else rows, self.batch.bucket)

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
        keys = [key for key, stats in self.stats.items() if stats.summed]
        if not keys:
            return
        totals = torch.stack([self.stats[key].sum.sum() + self.stats[key].xxt.diagonal(dim1=-2, dim2=-1).sum() for key in keys])
        if bool(torch.isfinite(totals).all()):
            return
        bad_key = keys[int((~torch.isfinite(totals)).nonzero()[0])]
        names = [n for n, e in self.module_map.items() if e["key"] == bad_key]
        raise CntinitError(f"non-finite activations (NaN/Inf, or squares beyond the sums' range) entering {', '.join(names)}: "
                           "run with --dtype float32, or --accumulate float64 for activations this large")
