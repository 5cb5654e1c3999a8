"""The command line: thin glue over the Python API. Results go to stdout, everything else to stderr."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import typer.core
from rich.markup import escape
from rich.table import Table

from . import __version__, console, tables
from .errors import CntinitError, first_line

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_errors

# The stages (torch, transformers, peft) are imported inside the commands that run them, so that
# `cntinit --help` and `cntinit solve --help` answer at once (benchmarks/startup.py measures it).

class _PlainHelpOption:
    """--help is a flag too: no `<bool>` beside it."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_PlainHelpOption, typer.core.TyperCommand):
    pass


class _Group(_PlainHelpOption, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    help="Data-driven LoRA initializations: capture activation statistics, solve inits, export adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"cntinit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print cntinit's version and exit.", is_eager=True,
                                       callback=_print_version, metavar="")) -> None:
    pass


def _flag(*declarations: str, help: str, default: bool = False):
    """An on/off option, shown in --help without a `<bool>` type column (a flag takes no value)."""
    return typer.Option(default, *declarations, help=help, metavar="")


QUIET = _flag("--quiet", "-q", help="Nothing on stderr but errors: no progress, logs, tables or warnings.")
JSON = _flag("--json", help="Print a JSON summary on stdout instead of the output path.")


def _follower() -> bool:
    """A process of a torchrun job other than rank 0, which writes and prints for all."""
    return int(os.environ.get("RANK", "0")) != 0


def _torchrun_needs_out(out: Optional[Path]) -> None:
    if out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CntinitError("under torchrun give --out (a directory every process can reach): the cache belongs to one process")


def _finish(path: Path, as_json: bool) -> None:
    """stdout carries only the path (so `$(cntinit capture ...)` composes), or a JSON summary;
    under torchrun only rank 0 prints it."""
    from .storage.store import Store
    if _follower():
        return
    if as_json:
        typer.echo(json.dumps(tables.summary(Store(path, verify=False)), indent=2))
    else:
        typer.echo(str(path))


@app.command(cls=_Command)
def capture(
    model: str = typer.Argument(..., metavar="MODEL", help="A model directory — transformers (text or vision: config.json, weights) or a diffusers pipeline directory (model_index.json and its components: SD 1.x/2.x and SDXL with a UNet, Flux and SD3 with a transformer) — or a Hugging Face Hub id (org/name) from the Hugging Face cache, downloaded there (only the files read) when missing unless HF_HUB_OFFLINE=1."),
    data: str = typer.Option(..., "--data", "-d", help="Text models: a .jsonl (field `text`, chat `messages`, or prompt + completion; for vision-language models each with `image`/`images` paths), a .txt (one sample per line), a directory of them, - for JSONL on stdin; with `pip install 'cntinit[datasets]'` also .parquet, .arrow, .csv, .json (a list of records), a save_to_disk folder, or a Hub dataset id (org/name, with --split). Vision models and pipelines: a folder of .jpg/.png/.webp images (recursive); a pipeline's captions come from metadata.jsonl/captions.jsonl there ({\"file_name\", \"text\"} per line) or --prompt."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A Hub id MODEL's branch, tag or commit (default: main)."),
    split: Optional[str] = typer.Option(None, "--split", help="Datasets: the split to read (default: train, or the only one), e.g. train_sft."),
    data_config: Optional[str] = typer.Option(None, "--data-config", help="Datasets with several configs (subsets): the one to read, e.g. sst2 of nyu-mll/glue."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store directory to write (default: the cache — $CNTINIT_CACHE — where a repeated capture is a hit that computes nothing)."),
    targets: str = typer.Option("all-linear", "--targets", "-t", help="Comma-separated module-name suffixes (q_proj,v_proj) or all-linear (every linear layer but the output head)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per sequence; longer samples are truncated."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Sequences per forward pass."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", "--samples", "-n", help="Use only N samples: the first N, or N drawn with --shuffle-seed."),
    shuffle_seed: Optional[int] = typer.Option(None, "--shuffle-seed", help="Text models: draw the samples in an order set by this seed (reproducible; with --max-samples, N records drawn from the whole data)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="Model dtype: auto (checkpoint's on GPU, float32 on CPU), float32, bfloat16, float16."),
    buckets: int = typer.Option(1, "--buckets", help="Keep K partial sums over consecutive slices of the data (for the robust estimate)."),
    pack: bool = _flag("--pack", help="Concatenate samples and cut them into --seq-len pieces instead of one sample per sequence."),
    accumulate: str = typer.Option("float32", "--accumulate", help="Precision of the sums: float32 or float64."),
    text_field: str = typer.Option("text", "--field", "--text-field", help="The record field or column holding the text (default text; without it, chat `messages`, then `prompt` + `completion`)."),
    sample_max_norm: bool = _flag("--sample-max-norm", help="Divide each sample's inputs by |its largest entry| before summing, as PEFT's CorDA preprocessing does (to reproduce PEFT's corda exactly)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Images: resize the shorter side to N and center-crop N×N (vision default: the model's preprocessor_config.json; pipeline default: the UNet's resolution)."),
    image_mean: str = typer.Option("0.5,0.5,0.5", "--image-mean", help="Vision models with --image-size or without a preprocessor config: per-channel mean."),
    image_std: str = typer.Option("0.5,0.5,0.5", "--image-std", help="Vision models with --image-size or without a preprocessor config: per-channel std."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Pipelines: this prompt for every image instead of captions, e.g. \"a photo of sks dog\"."),
    noise_timestep: Optional[int] = typer.Option(None, "--noise-timestep", help="Pipelines: feed the UNet or transformer latents noised to timestep t by the pipeline's scheduler (flow matching: σ = the training schedule's sigmas[N − 1 − t]; default: clean latents)."),
    t5_tokens: Optional[int] = typer.Option(None, "--t5-tokens", help="Flux and SD3 pipelines: pad T5 prompts to N tokens, as sd-scripts' --t5xxl_max_token_length (default: 512 for Flux dev, 256 for schnell and SD3)."),
    seed: int = typer.Option(0, "--seed", help="Pipelines: seed of the noise (--noise-timestep) and, with --gradients, of the random timesteps."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Save the running sums every N batches (N blocks with --layerwise; with --gradients too, on the way down), and on Ctrl-C/SIGTERM, beside --out; the same command run again resumes from them."),
    offload: bool = _flag("--offload", help="For models larger than the device: accelerate places the weights on the device, then CPU memory, then disk (beside --out), and streams them in layer by layer."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="--offload: limits per place, e.g. cuda=20GiB,cpu=64GiB (default: what accelerate finds free)."),
    stats_device: Optional[str] = typer.Option(None, "--stats-device", help="Where the running sums live: cpu keeps their d² per statistic off the GPU (default: --device)."),
    layerwise: bool = _flag("--layerwise", help="Read and run one block at a time (a 70B model on one GPU): the memory of one block's weights and statistics plus every batch's hidden states; the same statistics. --checkpoint-every then counts blocks."),
    activations_device: Optional[str] = typer.Option(None, "--activations-device", help="--layerwise: where the hidden states wait between blocks: cpu keeps them off the GPU (default: --device)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Capture only share I of N of the data (I/N, e.g. 0/4), for array jobs; `cntinit merge` of all N equals one run."),
    gradients: bool = _flag("--gradients", help="Also sum each target weight's gradient of the training loss, in the same pass, for --mode lora-ga and lora-one: a causal LM's next-token loss (padding and prompts carry no label), or a pipeline's denoising loss (latents noised as training does, at random timesteps unless --noise-timestep; the statistics are of that forward too). With --layerwise, backward runs block by block."),
    gradients_only: bool = _flag("--gradients-only", help="--gradients without the activation statistics: the store serves --mode lora-ga and lora-one only, and the pass skips summing Σxxᵀ of every target (its cost beside backward, and its memory)."),
    gradient_checkpointing: bool = _flag("--gradient-checkpointing", help="--gradients: recompute each block's activations during backward instead of keeping them (less memory, about one more forward)."),
    overwrite: bool = _flag("--overwrite", help="Replace --out even if it is a store of another model or another cntinit output (never a folder or file of yours)."),
    trust_remote_code: bool = _flag("--trust-remote-code", help="Allow the model directory's own Python code to run."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Stream calibration data through MODEL and save per-layer input statistics (Σxxᵀ, Σx, n).

    Examples:

      cntinit capture ./Llama-3.2-1B --data calib.jsonl --targets q_proj,k_proj,v_proj,o_proj --out stats/

      cat calib.jsonl | cntinit capture ./model --data - --out stats/ --buckets 4

      cntinit capture ./dinov2-base --data images/ --out stats/ --targets query,key,value

      cntinit capture ./SmolLM2-135M --data calib.jsonl --gradients --out stats-grad/   # for --mode lora-ga, lora-one

      cntinit capture ./SmolLM2-135M --data calib.jsonl --gradients-only --out grad/   # lora-ga, lora-one alone: faster

      cntinit capture HuggingFaceTB/SmolLM2-135M --data HuggingFaceH4/ultrachat_200k --split train_sft --samples 512 --shuffle-seed 0 --out stats/

      cntinit capture llava-hf/llava-1.5-7b-hf --data captions.jsonl --targets 're:.*self_attn\\.(q_proj|v_proj)' --seq-len 1024 --out stats/   # images + text

      cntinit capture ./sd15 --data dog/ --prompt "a photo of sks dog" --targets to_q,to_k,to_v,to_out.0,q_proj,k_proj,v_proj,out_proj --out stats/

      cntinit export $(cntinit solve $(cntinit capture ./model --data calib.jsonl) --mode cnt-s) --out adapter/   # stores in the cache
    """
    console.quiet = quiet
    model_dir = _located(model, revision, trust_remote_code)  # refusals of a model or data that is not there come before torch loads
    _check_data(data, split, text_field, data_config)
    from . import runner
    from .capture import capture as run_capture
    options = dict(
        seq_len=seq_len, batch_size=batch_size, max_samples=max_samples, dtype=dtype, buckets=buckets, pack=pack,
        accumulate=accumulate, text_field=text_field, split=split, data_config=data_config, shuffle_seed=shuffle_seed, sample_max_norm=sample_max_norm, image_size=image_size,
        image_mean=_rgb(image_mean, "--image-mean"), image_std=_rgb(image_std, "--image-std"), prompt=prompt,
        noise_timestep=noise_timestep, t5_tokens=t5_tokens, seed=seed, shard=shard, checkpoint_every=checkpoint_every, offload=offload,
        max_memory=max_memory, stats_device=stats_device, layerwise=layerwise, activations_device=activations_device,
        gradients=gradients, gradients_only=gradients_only, gradient_checkpointing=gradient_checkpointing,
    )
    _torchrun_needs_out(out)
    if out is None:
        path, hit = runner.cached_capture(model_dir, data, targets=targets, device=device, trust_remote_code=trust_remote_code, **options)
        _say_cached(path, hit)
    else:
        path = run_capture(model_dir, data, out, targets=targets, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
                           **options)
    _finish(path, as_json)


def _located(model: str | None, revision: str | None, trust_remote_code: bool) -> Path | None:
    """The model's local directory (a Hub id's cached snapshot), found without loading torch."""
    from .models.source import locate
    if model is None:
        if revision is not None:
            raise CntinitError("--revision picks a commit of a Hub id --model: add --model org/name, or leave out --revision")
        return None
    return locate(model, revision, trust_remote_code)


def _check_data(data: str, split: str | None, field: str, config: str | None) -> None:
    """Calibration data that is not there, or a config, split or column a dataset lacks, refused without loading torch."""
    from . import records
    records.check(data, split, field, config)


def _say_cached(path: Path, hit: bool) -> None:
    if hit:
        console.log(f"cache hit: {path} (nothing computed)")


def _rgb(text: str, option: str) -> tuple[float, ...]:
    values = tuple(_floats(text, option))
    if len(values) != 3:
        raise CntinitError(f"{option} needs one value per RGB channel (3), got {len(values)}")
    return values


@app.command(cls=_Command)
def merge(
    stores: list[Path] = typer.Argument(..., metavar="STORES", help="Two or more stores of the same model and targets."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged store directory to write."),
    overwrite: bool = _flag("--overwrite", help="Replace --out even if it is a store of another model or another cntinit output (never a folder or file of yours)."),
    allow_duplicates: bool = _flag("--allow-duplicates", help="Sum whole captures of the same data (a store given twice), which counts every sample twice; refused without it."),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Sum statistics stores of one model (shards of one calibration set) into one.

    Example:  for i in 0 1 2; do cntinit capture ./model --data calib.jsonl --shard $i/3 --out stats-$i; done
              cntinit merge stats-0 stats-1 stats-2 --out stats     # equals one capture over calib.jsonl
    """
    from .storage.store import merge as run_merge
    console.quiet = quiet
    _finish(run_merge(stores, out, overwrite, allow_duplicates), as_json)


@app.command(cls=_Command)
def inspect(
    directory: Path = typer.Argument(..., metavar="DIRECTORY", help="A statistics store or a solve directory."),
    as_json: bool = _flag("--json", help="Print the whole manifest as JSON."),
    verify: bool = _flag("--verify/--no-verify", default=True, help="Check payload checksums, reading every payload again (stores; solve directories are always checked). `solve` takes a payload verified before, and unchanged since, as verified."),
) -> None:
    """Show what a store holds (model, data, options, statistics) or a solve's report.

    Examples:  cntinit inspect stats/    cntinit inspect init-s16/ --json | jq .params
    """
    from .solve import solution
    from .solve.solution import Solution
    from .storage.store import Store, read_manifest
    if read_manifest(directory, solution.FORMAT) is not None:
        sol = Solution(directory)
        if as_json:
            typer.echo(json.dumps(sol.manifest, indent=2))
        else:
            tables.print_report(sol.report, console.stdout())
        return
    store = Store(directory, verify=verify, reread=verify)
    if as_json:
        typer.echo(json.dumps(store.manifest, indent=2))
        return
    tables.print_store(store, console.stdout())


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CntinitError(f"{option} {text} is not a comma-separated list of numbers, e.g. 1,1,0.5") from None


@app.command(cls=_Command)
def solve(
    capture_dir: Optional[Path] = typer.Argument(None, metavar="CAPTURE_DIR", help="A statistics store written by `cntinit capture` (data-free modes may give --model instead)."),
    mode: str = typer.Option(..., "--mode", "-m", help="cnt-x (Cross: WΣ⁺), cnt-s (Self: WD^-1/2Pᵀ), cnt-sh (Shift: c((I−Σ)Wᵀ)⁺); from a capture also eva, corda; from a --gradients capture lora-ga, lora-one; data-free lora, pissa, milora, olora, mica (B frozen by PEFT), inilora, inilora-alpha, inilora-beta, loftq (4-bit base)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Solve directory to write (default: the cache — $CNTINIT_CACHE — where a repeated solve is a hit that computes nothing)."),
    rank: int = typer.Option(16, "--rank", "-r", help="Adapter rank per module (the base rank with --vas)."),
    rcond: float = typer.Option(1e-4, "--rcond", help="Eigenvalue floor relative to the largest: below it, values count as zero (pseudo-inverse) or are clamped (inverse root)."),
    centered: bool = _flag("--centered", help="Use the centered covariance Σ − μμᵀ instead of the second moment Σ."),
    self_form: str = typer.Option("paper", "--self-form", help="cnt-s only: paper (W D^-1/2 Pᵀ, eigenbasis-dependent) or zca (W Σ^-1/2)."),
    shift_c: float = typer.Option(1.0, "--shift-c", help="cnt-sh only: the constant c in C = c·I."),
    bucket_weights: Optional[str] = typer.Option(None, "--bucket-weights", help="Weights w_j of the robust average over the capture's buckets (eq. 18), comma-separated; default all 1."),
    pooled: bool = _flag("--pooled", help="Ignore the capture's buckets: one estimate from the pooled statistics."),
    decompose: Optional[str] = typer.Option(None, "--decompose", help="Rank-r split of ΔW: svd (best rank-r approximation; the default) or qr."),
    split_p: float = typer.Option(0.5, "--split-p", help="svd only: B = U S^(1−p), A = S^p Vᵀ."),
    init: Optional[str] = typer.Option(None, "--init", help="offset (CNT, lora, eva, mica): base stays W, initial model W + BA. residual (pissa, milora, olora, corda, inilora*; optional for CNT): base becomes W − BA, initial model = pretrained."),
    vas: bool = _flag("--vas", help="Variable ranks from the pooled relative variances of ΔW's singular values."),
    budget: Optional[int] = typer.Option(None, "--budget", help="--vas: total rank over all modules (default rank × modules)."),
    min_rank: int = typer.Option(0, "--min-rank", help="--vas: smallest rank per module; 0 lets a module go without adapter."),
    max_rank: Optional[int] = typer.Option(None, "--max-rank", help="--vas: largest rank per module (default min(in, out))."),
    niter: Optional[int] = typer.Option(None, "--niter", help="pissa, lora-ga: randomized SVD with N subspace iterations instead of the exact one (PEFT's pissa_niter_N; PEFT's lora_ga always takes 4)."),
    lora_init: Optional[str] = typer.Option(None, "--lora-init", help="lora: kaiming (PEFT's default, A ~ U(±1/√in)) or gaussian (A ~ N(0, 1/r²)); B = 0."),
    rho: Optional[float] = typer.Option(None, "--rho", help="eva: a module may get up to round(rank·rho) of the redistributed rank (default 2; 1 = fixed ranks)."),
    corda_mode: Optional[str] = typer.Option(None, "--corda-mode", help="corda: ipm (principal components of WC, the default) or kpm (minor ones, knowledge-preserving)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="inilora*: run exactly N Adam steps (default: inilora stops early, at most 20000; alpha/beta only draw, no steps)."),
    direction: Optional[str] = typer.Option(None, "--direction", help="lora-ga: which of G's 2r leading singular vectors go to A and B: ArB2r (A the first r, B the next r; PEFT's default), A2rBr, ArBr (alternating), random."),
    scale: Optional[str] = typer.Option(None, "--scale", help="lora-ga, lora-one: stable (the default: lora-ga B × out^¼/√γ; lora-one B, A ÷ √γ), weight_svd (lora-ga: B's largest singular value becomes W's), gd_scale (B, A ÷ the LoRA scale), unit."),
    stable_gamma: Optional[float] = typer.Option(None, "--stable-gamma", help="lora-ga, lora-one: γ of --scale stable (default 16 for lora-ga as PEFT, 128 for lora-one as its authors)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="lora-ga, lora-one: the lora_alpha you will train with (default: --rank, scale 1); B and A are sized for it, and export uses it."),
    rslora: bool = _flag("--rslora", help="lora-ga, lora-one: the trainer's scale is α/√r (rsLoRA)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="nf4: for a QLoRA trainer (load_in_4bit), ship the base as NF4(W − BA) — exactly what bitsandbytes loads — instead of W − BA (residual inits; QPiSSA with pissa). The report adds the quantization error next to plain QLoRA's."),
    bits: Optional[int] = typer.Option(None, "--bits", help="loftq: bits of the quantized base (4: NF4, PEFT's LoftQConfig default and the only one offered)."),
    out_delta: Optional[float] = typer.Option(None, "--out-delta", help="cnt-x, cnt-s, cnt-sh: multiply every update BA by one factor so that the median out Δ (the report's output change on the calibration data) is this, e.g. 0.02: the paper's directions at a size that keeps an offset init near the pretrained model."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="cnt-x, cnt-s, cnt-sh: 'trace' divides each Σ by its mean eigenvalue (tr Σ / d) before the target, so the formulas see inputs of average variance 1, as the paper's whitened features have."),
    damping: Optional[float] = typer.Option(None, "--damping", help="cnt-x, cnt-s: add δ·(tr Σ / d)·I to Σ before inverting it, a floor relative to the average variance (the --rcond floor is relative to the largest)."),
    loftq_iter: Optional[int] = typer.Option(None, "--loftq-iter", help="loftq: alternations of quantizing W − BA and refitting BA to W − Q (default 1, as PEFT)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random draws (lora, pissa and lora-ga --niter, inilora*, lora-ga --direction random)."),
    model: Optional[str] = typer.Option(None, "--model", help="Read the weights from here (a directory or a Hub id) instead of the path the capture recorded (they must be the same weights); without a capture, the model to solve."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A Hub id --model's branch, tag or commit (default: main)."),
    targets: Optional[str] = typer.Option(None, "--targets", "-t", help="Which modules to solve: module-name suffixes (q_proj,v_proj) or re:PATTERN; from a capture, a subset of the captured modules (default: all of them); without one, all-linear by default."),
    device: str = typer.Option("auto", "--device", help="auto (cuda if present), cpu, or cuda."),
    offload: bool = _flag("--offload", help="Load the model within --max-memory (accelerate: CPU memory, then disk). A transformers model in safetensors needs none: its weights are read by name, a batch at a time; this is for pipelines and checkpoints transformers converts on load."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="--offload: limits per place, e.g. cuda=20GiB,cpu=64GiB (default: what accelerate finds free)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Precision of the eigen/SVD work: float64 or float32 (default float64; float32 with --niter, whose randomized SVD is approximate anyway and which PEFT computes in float32: randomized PiSSA's solve of SmolLM2-135M about 3× faster on 2 CPU cores). IniLoRA's Adam always runs in float32, as the authors' code."),
    overwrite: bool = _flag("--overwrite", help="Replace --out even if it is a solve directory of another model or another cntinit output (never a folder or file of yours)."),
    trust_remote_code: bool = _flag("--trust-remote-code", help="Allow the model directory's own Python code to run."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the rank per module and each split's singular values into this PNG (needs matplotlib)."),
    quiet: bool = QUIET,
    lora_lr: Optional[float] = typer.Option(None, "--lr", help="The learning rate you would give plain LoRA on this task: the report then prints, as rates, the range the benchmarks found best for this init (as shares of LoRA's best it is always in report.json as lr_advice)."),
    as_json: bool = _flag("--json", help="Print report.json, with the solve directory's path, on stdout instead of the path alone."),
) -> None:
    """Compute an initialization per module (ConsNoTrainLoRA, IniLoRA or a baseline) and print a report.

    Baselines: LoRA, PiSSA, MiLoRA, OLoRA, EVA, CorDA; from a --gradients capture LoRA-GA and LoRA-One.

    Examples:

      cntinit solve stats/ --mode cnt-s --rank 16 --out init-s16/

      cntinit solve stats/ --mode cnt-x --rank 8 --vas --budget 512 --out init-x-vas/

      cntinit solve stats/ --mode eva --rank 16 --out init-eva/

      cntinit solve stats-all-linear/ --targets q_proj,v_proj --mode cnt-s --out init-qv/   # one capture, any subset

      cntinit solve stats-grad/ --mode lora-ga --rank 8 --alpha 16 --out init-ga/   # from capture --gradients

      cntinit solve --model ./Llama-3.2-1B --mode loftq --targets all-linear --rank 16 --out init-loftq/   # for a 4-bit QLoRA trainer

      cntinit solve --model ./Llama-3.2-1B --mode inilora --targets q_proj,v_proj --rank 8 --out init-ini/

      cntinit solve --model meta-llama/Llama-3.2-1B --mode pissa --rank 16 --out init-pissa/   # a Hub id, from the Hugging Face cache
    """
    console.quiet = quiet
    model = _located(model, revision, trust_remote_code)
    from . import plots, runner
    from .solve import Options, learning_rate
    from .solve import solve as run_solve
    from .solve.solution import Solution
    options = Options(
        mode=mode, rank=rank, rcond=rcond, centered=centered, self_form=self_form, shift_c=shift_c,
        bucket_weights=_floats(bucket_weights, "--bucket-weights"), pooled=pooled, decompose=decompose,
        split_p=split_p, init=init, vas=vas, budget=budget, min_rank=min_rank, max_rank=max_rank, precision=precision,
        seed=seed, niter=niter, lora_init=lora_init, rho=rho, corda_mode=corda_mode, steps=steps,
        direction=direction, scale=scale, stable_gamma=stable_gamma, alpha=alpha, rslora=rslora or None,
        quantize=quantize, bits=bits, loftq_iter=loftq_iter, out_delta=out_delta, normalize=normalize, damping=damping,
    )
    _torchrun_needs_out(out)
    learning_rate.check_lora_lr(lora_lr)
    if out is None:
        path, hit = runner.cached_solve(capture_dir, options, model=model, targets=targets, device=device, trust_remote_code=trust_remote_code,
                                        offload=offload, max_memory=max_memory)
        _say_cached(path, hit)
    else:
        path = run_solve(capture_dir, out, options, model=model, targets=targets, device=device, overwrite=overwrite,
                         trust_remote_code=trust_remote_code, offload=offload, max_memory=max_memory)
    if _follower():
        return
    report = Solution(path).report
    if not quiet:
        tables.print_report(report, console.err, lora_lr)
    if plot is not None:
        if not plots.available():
            raise CntinitError(f"--plot needs matplotlib: {plots.INSTALL}")
        console.log(f"plot: {plots.write_report_plot(report, plot)}")
    given = learning_rate.rates(report.get("lr_advice"), lora_lr)
    typer.echo(json.dumps({"path": str(path)} | ({"lr_range": given} if given else {}) | report, indent=2) if as_json else str(path))


@app.command(cls=_Command)
def export(
    solve_dir: Path = typer.Argument(..., metavar="SOLVE_DIR", help="A solve directory written by `cntinit solve`."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter directory to write."),
    format: str = typer.Option("peft", "--format", "-f", help="peft (transformers models), kohya or diffusers (diffusion pipelines: one safetensors file for sd-scripts' --network_weights, or pytorch_lora_weights.safetensors for pipe.load_lora_weights)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="lora_alpha (default: the solve's --rank, so the scale is 1; lora-ga and lora-one: the α their factors were sized for). The scale is folded into the factors: the adapter adds exactly BA for any alpha."),
    rslora: bool = _flag("--rslora", help="Rank-stabilized scale α/√r (PEFT only)."),
    dora: bool = _flag("--dora", help="DoRA: also write the magnitude vectors, as PEFT computes them (needs the model weights)."),
    fixed_alpha: bool = _flag("--fixed-alpha", help="Variable ranks: every module gets --alpha instead of an alpha pattern that keeps the scale α/r constant."),
    module_prefix: str = typer.Option("", "--module-prefix", help="Prepend this to every module path, e.g. bert. when the capture ran BertModel and training loads BertForSequenceClassification."),
    task_type: str = typer.Option("auto", "--task-type", help="PEFT's task_type in adapter_config.json (it picks the PeftModel class a trainer gets; axolotl's LoRA kernels need CAUSAL_LM): auto reads it from the model class (LlamaForCausalLM → CAUSAL_LM, BertModel → FEATURE_EXTRACTION; none for vision encoders and with --module-prefix), or CAUSAL_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM, FEATURE_EXTRACTION, none."),
    train_dtype: str = typer.Option("auto", "--train-dtype", help="Residual inits: the dtype training will run the base in (auto: the model's own; bfloat16, float16, float32), for the warning when W − BA loses W in it."),
    unet_only: bool = _flag("--unet-only", help="Pipelines: leave the text-encoder modules out, for training the UNet or transformer alone (sd-scripts' --network_train_unet_only); refused for a residual solve that adapts the text encoder."),
    model: Optional[str] = typer.Option(None, "--model", help="Read the weights (for --dora or a residual base) from here (a directory or a Hub id) instead of the recorded path."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A Hub id --model's branch, tag or commit (default: main)."),
    overwrite: bool = _flag("--overwrite", help="Replace --out even if it is an export of another model or another cntinit output (never a folder or file of yours)."),
    check: bool = _flag("--check", help="Load the written adapter with PEFT (peft) or diffusers' load_lora_weights (kohya, diffusers) and compare every module's output with (W + BA)x."),
    trust_remote_code: bool = _flag("--trust-remote-code", help="Allow the model directory's own Python code to run."),
    lora_lr: Optional[float] = typer.Option(None, "--lr", help="The learning rate you would give plain LoRA: the rates the benchmarks found best for this init are printed and recorded in the export's manifest.json."),
    quiet: bool = QUIET,
) -> None:
    """Write the solved initialization as adapter files a trainer loads (plus the residual base when the init needs one).

    Examples:

      cntinit export init-s16/ --format peft --out adapter/

      cntinit export init-x-vas/ --out adapter/ --alpha 32 --rslora

      cntinit export sd-init/ --format kohya --alpha 256 --out kohya/

    Load it:  PeftModel.from_pretrained(base, "adapter/", is_trainable=True), pipe.load_lora_weights("diffusers-out/"), or sd-scripts' --network_weights kohya/lora.safetensors
    """
    console.quiet = quiet
    model = _located(model, revision, trust_remote_code)
    from .export import export as run_export
    path = run_export(solve_dir, out, format=format, alpha=alpha, rslora=rslora, dora=dora, fixed_alpha=fixed_alpha,
                      module_prefix=module_prefix, task_type=task_type, train_dtype=train_dtype, unet_only=unet_only, model=model, overwrite=overwrite,
                      trust_remote_code=trust_remote_code, check=check, lora_lr=lora_lr)
    typer.echo(str(path))


@app.command(name="run", cls=_Command)
def run_recipe(
    recipe_file: Path = typer.Argument(..., metavar="RECIPE", help="A recipe YAML: model, targets, capture, solves, exports (see recipes/ and README)."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="KEY=VALUE", help="Dotted overrides, values read as YAML: model=./my-model capture.max_samples=64 solves.0.rank=32 exports.0.alpha=64"),
    trust_remote_code: bool = _flag("--trust-remote-code", help="Allow the model directory's own Python code to run (a recipe cannot ask for it)."),
    quiet: bool = QUIET,
    as_json: bool = _flag("--json", help="Print the run's summary as JSON on stdout instead of the export paths."),
) -> None:
    """Run a recipe: its capture, solves and exports, reusing cached captures and solves.

    Captures and solves live in the cache ($CNTINIT_CACHE, default ~/.cache/cntinit); a stage whose inputs (model and data contents, every option) were seen before is a hit that computes nothing.

    The recipe is checked whole before anything runs. Exports land in OUT/<solve>/<export>/, beside each solve's report.json and report.png; stdout lists the export directories.

    Examples:

      cntinit run recipes/minilm-embedded.yaml

      cntinit run recipes/sd15-dreambooth.yaml model=/models/sd15 capture.data=photos/dog solves.0.rank=64

      cntinit run recipes/llama2-7b-inilora.yaml --json | jq -r '.exports[]'
    """
    from . import recipe
    console.quiet = quiet
    plan = recipe.load(recipe_file, overrides or [])  # a missing model or data is refused here, before the stages load
    from . import runner
    summary = runner.run(plan, trust_remote_code=trust_remote_code)
    if not quiet:
        tables.print_run(summary, console.err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for path in summary["exports"] or [row["path"] for row in summary["stages"] if row["stage"] == "solve"]:
            typer.echo(path)


cache_app = typer.Typer(cls=_Group, help="List and clean the cache of captures and solves ($CNTINIT_CACHE, default ~/.cache/cntinit).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls", cls=_Command)
def cache_ls(as_json: bool = _flag("--json", help="Print the entries as JSON.")) -> None:
    """List cached captures and solves, most recently used first.

    Example:  cntinit cache ls --json | jq -r '.[] | select(.kind == "capture") | .path'
    """
    from .storage import cache
    found = cache.entries()
    if as_json:
        typer.echo(json.dumps([{"kind": e.kind, "key": e.key, "label": e.meta.get("label"), "bytes": e.bytes, "used": e.used,
                                "path": str(e.path)} for e in found], indent=2))
        return
    tables.print_cache(found, cache.root(), cache.leftovers(), console.stdout())


@cache_app.command("rm", cls=_Command)
def cache_rm(keys: list[str] = typer.Argument(..., metavar="KEYS", help="Keys or unique key prefixes, as `cntinit cache ls` shows them.")) -> None:
    """Remove cache entries (a solve made from a removed capture stays until removed itself).

    Example:  cntinit cache rm 3f9a1c 77be02
    """
    from .storage import cache
    for entry in cache.match(keys):
        if not cache.remove(entry):
            raise CntinitError(f"{entry.key[:12]} is in use by a running cntinit: try again when it has finished")
        console.log(f"removed {entry.kind} {entry.key[:12]} ({entry.meta.get('label', '?')}, {tables.size(entry.bytes)})"
                    + (f": it was a link to {entry.link}, which is left as it is" if entry.link else ""))


@cache_app.command("prune", cls=_Command)
def cache_prune(
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Remove entries unused for this long: 12h, 30d, 2w."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Then remove the least recently used until the cache fits: 500M, 20G."),
    everything: bool = _flag("--all", help="Remove every entry."),
) -> None:
    """Remove old entries, or the least recently used until the cache fits a size.

    Example:  cntinit cache prune --older-than 30d --max-size 50G
    """
    from .storage import cache
    if not (older_than or max_size or everything):
        raise CntinitError("say what to prune: --older-than 30d, --max-size 20G, or --all")
    removed, busy = cache.prune(0.0 if everything else cache.parse_age(older_than) if older_than else None,
                                cache.parse_size(max_size) if max_size else None)
    links = [e for e in removed if e.link]
    console.log(f"removed {len(removed)} entries ({tables.size(sum(e.bytes for e in removed))})" +
                (f"; {len(links)} of them links, whose targets are left as they are (e.g. a link to {links[0].link})" if links else "") +
                (f"; {len(busy)} in use by a running cntinit were kept" if busy else ""))


@app.command(cls=_Command)
def demo(
    out: Path = typer.Option(Path("cntinit-demo"), "--out", "-o", help="Directory for the demo's outputs."),
    samples: int = typer.Option(512, "--samples", "-n", help="Calibration verses to use."),
    mode: str = typer.Option("cnt-s", "--mode", "-m", help="cnt-x, cnt-s or cnt-sh."),
    rank: int = typer.Option(8, "--rank", "-r", help="Adapter rank."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = _flag("--overwrite", help="Replace --out/stats, --out/solve-… and --out/adapter even if they are cntinit outputs of another kind or model (never a folder or file of yours)."),
) -> None:
    """Run the main job end to end on the embedded default (all-MiniLM-L6-v2 over KJV verses).

    Captures statistics, solves CNTLoRA, exports a PEFT adapter, loads it back with PEFT to check it.
    """
    from . import embedded
    from .capture import capture as run_capture
    from .export import export as run_export
    from .export import verify
    from .solve import Options
    from .solve import solve as run_solve
    from .solve.solution import Solution
    from .storage import store
    from .storage.store import Store, read_manifest
    stats_dir, solve_dir, adapter_dir = out / "stats", out / f"solve-{mode}-r{rank}", out / "adapter"
    for path, format in ((stats_dir, "cntinit.stats"), (solve_dir, "cntinit.solve"), (adapter_dir, "cntinit.export")):
        store.refuse_foreign(path.absolute())  # before any work
        empty = path.is_dir() and not any(path.iterdir())
        if path.exists() and not (overwrite or empty) and read_manifest(path, format) is None:
            raise CntinitError(f"{path} exists and is not an earlier demo's output: choose another --out or pass --overwrite")
    times = {}
    started = time.perf_counter()
    run_capture(embedded.model_dir(), embedded.data_file(), stats_dir, max_samples=samples, seq_len=128,
                batch_size=32, device=device, overwrite=overwrite)
    times["capture"] = time.perf_counter() - started
    tables.print_store(Store(stats_dir), console.err)
    started = time.perf_counter()
    run_solve(stats_dir, solve_dir, Options(mode=mode, rank=rank), device=device, overwrite=overwrite)
    times["solve"] = time.perf_counter() - started
    tables.print_report(Solution(solve_dir).report, console.err)
    started = time.perf_counter()
    run_export(solve_dir, adapter_dir, overwrite=overwrite)
    times["export"] = time.perf_counter() - started
    started = time.perf_counter()
    error = verify(adapter_dir, solve_dir)
    times["load with PEFT"] = time.perf_counter() - started
    table = Table("stage", "seconds", "output", title="cntinit demo")
    for (stage, seconds), path in zip(times.items(), (stats_dir, solve_dir, adapter_dir, f"max relative error {error:.1e}")):
        table.add_row(stage, f"{seconds:.1f}", str(path))
    console.err.print(table)
    typer.echo(str(adapter_dir))


OUT_OF_MEMORY_FIXES = {  # per command: what to change when the device runs out of memory
    "capture": "lower --batch-size or --seq-len, keep the sums in CPU memory (--stats-device cpu), or read the model block "
               "by block (--layerwise)",
    "capture --layerwise": "lower --batch-size or --seq-len, or keep the sums and the hidden states in CPU memory "
                           "(--stats-device cpu --activations-device cpu)",
    "solve": "free the device, or solve on the CPU (--device cpu)",
    "run": "lower the recipe's capture batch_size or seq_len, or give its solves device: cpu",
}


def main(argv: list[str] | None = None) -> None:
    console.quiet = False  # each command sets it; an earlier in-process call's --quiet must not leak
    try:
        try:
            # Not standalone: click's usage errors come here, to be said in one line like every other error.
            code = app(args=argv, prog_name="cntinit", standalone_mode=False)
        except RuntimeError as exc:
            error = _out_of_memory(exc, argv if argv is not None else sys.argv[1:])
            if error is None:
                raise
            raise error from None
    except click_errors.NoArgsIsHelpError as exc:  # a bare `cntinit` (or `cntinit cache`): the help, already shown
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        _say("error", _usage_error(exc))
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        _say("interrupted", "nothing was written")
        sys.exit(1)
    except CntinitError as exc:
        _say(exc.label, str(exc))
        sys.exit(exc.exit_code)
    if code == 130:  # Typer turns Ctrl-C into exit 130 without a word
        _say("interrupted", "nothing was written")
    sys.exit(code if isinstance(code, int) else 0)


def _say(label: str, message: str) -> None:
    console.err.print(f"[bold red]{label}:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _usage_error(exc: click_errors.ClickException) -> str:
    """click's own errors (an unknown option, a value of the wrong type, a missing argument) as one line that
    points at the command's --help, instead of its boxed usage block."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    return f"{message}: see {ctx.command_path} --help" if ctx is not None else message


def _out_of_memory(exc: RuntimeError, argv: list[str]) -> CntinitError | None:
    """A device out of memory (torch's OutOfMemoryError, a traceback) as one line with the command's fix;
    None for any other error. What the command was writing is discarded as for any error."""
    torch = sys.modules.get("torch")  # imported by the command that ran; the CLI itself does not load it
    if torch is None or not isinstance(exc, torch.OutOfMemoryError):
        return None
    command = next((arg for arg in argv if not arg.startswith("-")), "")
    if command == "capture" and "--layerwise" in argv:
        command = "capture --layerwise"
    return CntinitError(f"the device ran out of memory ({first_line(exc)}): "
                        f"{OUT_OF_MEMORY_FIXES.get(command, 'free the device, or run on the CPU (--device cpu)')}")
