"""Trainer options: ``parse_args(argv) -> TrainConfig``; nothing is parsed at import time."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from flamingo_data.errors import StartError, parser_flags, with_flags


@dataclass
class DatasetArg:
    name: str
    kind: str
    shards: str
    option: str = "dataset"  # the parameter that named it, for messages


MAX_DEFAULT_WARMUP = 10


@dataclass
class TrainConfig:
    datasets: list[DatasetArg]
    run_dir: str
    loss_weights: dict[str, float] = field(default_factory=dict)
    resume: bool = False
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int | None = None  # None: a tenth of steps, at most MAX_DEFAULT_WARMUP
    schedule: str = "cosine"
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    fsdp: bool = False
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    seed: int = 0
    workers: int = 0
    image_size: int = 32
    max_tokens: int = 128
    max_images: int = 6
    sim_threshold: float = 0.24
    loss_on: str = "assistant"
    tokenizer: str | None = None
    vision: str = "tiny"
    lm: str = "tiny"
    cross_attn_every_n_layers: int = 1
    init_from: str | None = None
    log_every: int = 1
    log_keys: bool = False
    wandb: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps is None:  # a short run is not spent warming up
            self.warmup_steps = min(MAX_DEFAULT_WARMUP, self.steps // 10)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's options alone (``parse_args``); the command line adds the same ones to its
    ``train`` subcommand with ``add_train_arguments``."""
    parser = argparse.ArgumentParser(
        prog="flamingo-data train", description="Train Flamingo on shards (torchrun for >1 process)"
    )
    add_train_arguments(parser)
    return parser


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Every trainer option, on ``p``."""
    p.add_argument("--mmc4-shards", help="interleaved shards (MMC4 form)")
    p.add_argument("--laion-shards", help="image-text pair shards")
    p.add_argument("--gpt-shards", help="ChatGPT-generated sequence shards")
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=KIND:SPEC",
        help="any dataset, e.g. conv=interleaved:conv-shards/ (repeatable)",
    )
    p.add_argument(
        "--loss-weights", default="", help="per-dataset loss weights, e.g. mmc4=1.0,laion=0.2"
    )
    p.add_argument("--run-dir", required=True, help="folder for checkpoints and log.jsonl")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --run-dir"
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument(
        "--batch-size", type=int, default=8, help="per dataset, per process, per micro-step"
    )
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help=f"steps of linear warmup up to --lr (default: a tenth of --steps, at most "
        f"{MAX_DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="learning-rate decay after warmup",
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard)")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="compute precision"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, more time",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initial weights and the data order"
    )
    p.add_argument("--workers", type=int, default=0, help="loader worker processes per dataset")
    p.add_argument(
        "--image-size", type=int, default=32, help="image side in px the vision encoder takes"
    )
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per sample at most")
    p.add_argument("--max-images", type=int, default=6, help="images per sample at most")
    p.add_argument(
        "--sim-threshold",
        type=float,
        default=0.24,
        help="interleaved: similarity under which an image is dropped",
    )
    p.add_argument(
        "--loss-on",
        choices=("assistant", "all"),
        default="assistant",
        help="assistant (default): records that name their turns' roles (converted"
        " conversations) train on the assistant's turns only; all: on all their text",
    )
    p.add_argument(
        "--tokenizer", default=None, help="local Hugging Face tokenizer path (default: built-in)"
    )
    p.add_argument("--vision", default="tiny", help="tiny | hf:<path> | open_clip:<arch>:<weights>")
    p.add_argument("--lm", default="tiny", help="tiny | hf:<path>")
    p.add_argument(
        "--cross-attn-every-n-layers",
        type=int,
        default=1,
        help="a gated cross-attention block every N language-model layers",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="openflamingo:PATH",
        help="start from an OpenFlamingo checkpoint.pt (over --vision, --lm and --tokenizer)",
    )
    p.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines")
    p.add_argument("--log-keys", action="store_true", help="log rank 0's sample keys per step")
    p.add_argument(
        "--wandb", action="store_true", help="also log to Weights & Biases (if installed)"
    )
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save a checkpoint and exit after this many steps in this run (testing)",
    )


KINDS = ("interleaved", "pair", "gpt", "auto")
AT_LEAST_ONE = (
    "batch_size",
    "grad_accum",
    "checkpoint_every",
    "log_every",
    "cross_attn_every_n_layers",
    "max_tokens",
    "max_images",
    "image_size",
)
AT_LEAST_ZERO = ("steps", "warmup_steps", "workers")
FINITE = ("lr", "weight_decay", "max_grad_norm", "sim_threshold")


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Options -> TrainConfig; a bad value is a usage error (exit 2), not a crash mid-run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as exc:
        parser.error(with_flags(str(exc), parser_flags(parser)))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed trainer options as a checked TrainConfig; raises StartError on a bad value."""
    datasets = [
        DatasetArg(n, k, s, f"{n}_shards")
        for n, k, s in (
            ("mmc4", "interleaved", args.mmc4_shards),
            ("laion", "pair", args.laion_shards),
            ("gpt", "gpt", args.gpt_shards),
        )
        if s
    ]
    datasets += [_dataset_arg(text) for text in args.dataset]
    if not datasets:
        raise StartError(
            "give at least one of `mmc4_shards`, `laion_shards`, `gpt_shards`, `dataset`"
        )
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values.update(datasets=datasets, loss_weights=_weights(args.loss_weights))
    config = TrainConfig(**values)
    check(config)
    return config


def check(config: TrainConfig) -> None:
    """Refuse values that would crash a run after its first step, or silently train nothing."""
    for name in AT_LEAST_ONE:
        if getattr(config, name) < 1:
            raise StartError(f"`{name}` must be at least 1")
    for name in AT_LEAST_ZERO:
        if getattr(config, name) < 0:
            raise StartError(f"`{name}` must not be negative")
    if config.stop_after is not None and config.stop_after < 1:
        raise StartError("`stop_after` must be at least 1")
    for name in FINITE:  # nan passed every comparison above and trained on NaN from step 1
        if not math.isfinite(getattr(config, name)):
            raise StartError(f"`{name}` must be a finite number")
    if config.lm.startswith("hf:") and config.tokenizer is None:
        raise StartError(
            f"`lm` {config.lm} needs `tokenizer` (that LM's own): the built-in tokenizer's byte ids"
            " are other tokens to it"
        )
    if config.init_from is not None and not (
        config.init_from.startswith("openflamingo:") and config.lm.startswith("hf:")
    ):
        raise StartError(
            f"`init_from` wants openflamingo:PATH with an `lm` hf:<path>, got {config.init_from}"
            f" with `lm` {config.lm}"
        )
    names = [d.name for d in config.datasets]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise StartError(f"dataset name given twice: {', '.join(duplicates)}")
    if unknown := sorted(set(config.loss_weights) - set(names)):
        raise StartError(
            f"`loss_weights` names no dataset: {', '.join(unknown)} (datasets: {', '.join(names)})"
        )


def _dataset_arg(text: str) -> DatasetArg:
    name, _, rest = text.partition("=")
    kind, _, spec = rest.partition(":")
    if not (name and kind and spec):
        raise StartError(f"`dataset` wants NAME=KIND:SPEC, got {text!r}")
    if kind not in KINDS:
        raise StartError(f"`dataset` {text!r}: KIND must be one of {', '.join(KINDS)}")
    return DatasetArg(name, kind, spec)


def _weights(text: str) -> dict[str, float]:
    weights = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise StartError(f"`loss_weights` wants NAME=NUMBER,..., got {part!r}") from None
        if not (math.isfinite(weights[name.strip()]) and weights[name.strip()] >= 0):
            raise StartError(f"`loss_weights` wants finite weights of 0 or more, got {part!r}")
    return weights
