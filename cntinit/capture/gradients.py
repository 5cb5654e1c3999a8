"""Gradient capture: each target weight's gradient of the loss the model trains with — a causal
LM's next-token loss, a diffusion pipeline's denoising loss — for the gradient inits (LoRA-GA, LoRA-One).

G = (1/K) Σ over the K batches of ∇W of the batch's mean loss over its predicted tokens
(padding and prompt tokens carry no label) — METHODS.md's definition, what PEFT's
`preprocess_loraga` averages with one backward per batch. For a pipeline the predicted values
are the latents' (the "tokens" counted), and the batch's mean loss is the training scripts'
mean squared error of the UNet's prediction (`models/pipelines.py`'s `DiffusionParts`). The store keeps the
sum and K, so shards and processes add up. Only the target weights take gradients, each added into a
float32 (or float64) sum as soon as backward produces it, then freed. The model stays in eval
mode (no dropout): the gradient is of the pretrained model as it is.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CntinitError
from ..finite import all_finite
from ..models.linears import in_out_features
from ..models.loading import is_causal_lm

IGNORE = -100  # a position that predicts nothing


def check_model(net: nn.Module, kind: str, path) -> None:
    """Gradients need a training loss: a causal language model's, or a diffusion pipeline's."""
    if kind == "diffusion":
        net.noise_as_training()
    elif not (kind == "text" and is_causal_lm(net) or kind == "vlm" and type(net).__name__.endswith("ForConditionalGeneration")):
        raise CntinitError(f"--gradients takes the next-token loss of a causal language model (…ForCausalLM, or a vision-language "
                           f"…ForConditionalGeneration) or a diffusion "
                           f"pipeline's denoising loss; {path} is {type(net).__name__}, for which no loss is defined yet: "
                           "capture it without --gradients")


def labels(ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
    """Each position's next token, or IGNORE where there is none, it is padding, or (`targets`
    False) it is part of the prompt. On `ids`' device: a layerwise capture keeps the mask on the
    CPU and the ids on the GPU."""
    wanted = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
    if targets is not None:
        wanted &= targets.to(ids.device).bool()
    following = torch.full_like(ids, IGNORE)
    following[:, :-1] = torch.where(wanted[:, 1:], ids[:, 1:], IGNORE)
    return following


class GradientSums:
    """Σ over batches of ∂(batch mean loss)/∂W for every target weight (out × in), with the batch
    count K (batches with a token to predict) and the predicted tokens."""

    def __init__(self, modules: dict[str, nn.Module], dtype: torch.dtype, device: torch.device):
        self.modules = modules
        self.sums = {name: torch.zeros(*reversed(in_out_features(m)), dtype=dtype, device=device) for name, m in modules.items()}
        self.tokens = 0
        self.batches = 0
        self.loss = 0.0  # Σ token losses, for the manifest's mean loss

    @contextlib.contextmanager
    def taking(self, net: nn.Module):
        """Within: only the target weights take gradients, each added to its sum as it arrives."""
        was = {p: p.requires_grad for p in net.parameters()}
        handles = []
        try:
            for p in was:
                p.requires_grad_(False)
            for name, module in self.modules.items():
                module.weight.requires_grad_(True)
                transposed = not isinstance(module, nn.Linear)  # Conv1D stores Wᵀ

                def arrive(p, total=self.sums[name], transposed=transposed):
                    total.add_((p.grad.T if transposed else p.grad).to(total.dtype))
                    p.grad = None

                handles.append(module.weight.register_post_accumulate_grad_hook(arrive))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in was.items():
                p.requires_grad_(flag)
                p.grad = None

    def step(self, net: nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor | None, targets: torch.Tensor | None,
             backward_context=contextlib.nullcontext) -> None:
        """Forward one batch through `net`, backward its mean token loss (inside
        `backward_context()`: a checkpointed forward runs again there)."""
        with torch.enable_grad():
            if getattr(net, "training_noise", None) is not None:  # a diffusion pipeline: its prediction and training target
                loss, count = self.squared_error(*net(**inputs))
            else:
                no_cache = {"use_cache": False} if hasattr(net.config, "use_cache") else {}  # a checkpointed block must not append to a cache twice
                loss, count = self.loss_of(net(**inputs, **no_cache).logits, inputs["input_ids"], mask, targets)
            if count:
                with backward_context():
                    (loss / count).backward()

    def loss_of(self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor | None) -> tuple:
        """(Σ token losses, predicted tokens) of one batch, counted into the totals."""
        wanted = labels(ids, mask, targets).to(logits.device)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), wanted.flatten(), ignore_index=IGNORE, reduction="sum")
        return self._counted(loss, int((wanted != IGNORE).sum()))

    def _counted(self, loss: torch.Tensor, count: int) -> tuple:
        self.batches += int(count > 0)
        self.tokens += count
        self.loss += float(loss.detach())
        return loss, count

    def squared_error(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple:
        """(Σ squared errors, values predicted) of one denoising batch, counted into the totals."""
        loss = (prediction.float() - target.float()).square().sum()
        return self._counted(loss, target.numel())

    def check_finite(self) -> None:
        bad = next((name for name, total in self.sums.items() if not all_finite(total)), None)
        if bad:
            raise CntinitError(f"the gradient of {bad} came out NaN or Inf: capture with --dtype float32 (or --accumulate float64)")

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.grad": self.sums[name].float().cpu()}

    def state(self) -> dict[str, torch.Tensor]:
        """The sums and counters as held, for a checkpoint."""
        counters = torch.tensor([self.tokens, self.batches], dtype=torch.int64)
        return {f"{name}.grad": total.cpu() for name, total in self.sums.items()} | {
            "gradients.counters": counters, "gradients.loss": torch.tensor(self.loss, dtype=torch.float64)}

    def fits(self, state: dict[str, torch.Tensor]) -> bool:
        return "gradients.counters" in state and all(
            f"{name}.grad" in state and state[f"{name}.grad"].shape == total.shape for name, total in self.sums.items())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        for name, total in self.sums.items():
            total.copy_(state[f"{name}.grad"])
        self.tokens, self.batches = state["gradients.counters"].tolist()
        self.loss = float(state["gradients.loss"])

    def record(self) -> dict:
        """The store manifest's `gradients` section."""
        return {"tokens": self.tokens, "batches": self.batches, "mean_loss": self.loss / max(self.tokens, 1)}


def checkpointed_blocks(blocks: nn.ModuleList) -> contextlib.AbstractContextManager:
    """Within: each block recomputes its activations during backward instead of keeping them
    (torch's non-reentrant checkpointing; eval mode stays on, unlike transformers' own switch)."""
    stack = contextlib.ExitStack()
    for block in blocks:
        own = block.__dict__.get("forward")  # a forward set on the instance (a hook library's) is put back as it was
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        stack.callback(setattr, block, "forward", own) if own is not None else stack.callback(delattr, block, "forward")
    return stack
