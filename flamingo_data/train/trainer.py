"""Train Flamingo on shards: ``torchrun --nproc_per_node=N -m flamingo_data.train ...`` or in-process ``main(argv)``.

FSDP2 (``fully_shard``) on gloo (CPU) or nccl (GPU), bf16 mixed precision, activation checkpointing,
gradient accumulation, per-dataset loss weights, warmup + cosine/linear schedule, and checkpoints
that resume the exact data stream.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flamingo_data.core.schema import record_kind
from flamingo_data.errors import EmptyDataset
from flamingo_data.loader import DatasetSpec, LoaderConfig, build_loader, make_tokenizer
from flamingo_data.loader.imageproc import normalize_vision
from flamingo_data.loader.interleaved import Reject
from flamingo_data.loader.record import parse_json
from flamingo_data.model import build_flamingo, load_openflamingo_checkpoint, model_config
from flamingo_data.storage import remote
from flamingo_data.storage.shard_reader import iter_samples
from flamingo_data.storage.specs import expand_specs
from flamingo_data.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from flamingo_data.train.config import StartError, TrainConfig, parse_args

NO_DECAY_MARKERS = ("tokens.", "latents", "_gate", "norm", "bias")


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join torchrun's process group, or make a one-process group on 127.0.0.1 when run directly.

    The one-process group gets its own free port without touching os.environ: setting RANK and
    MASTER_PORT there leaked into the caller, so a later run or subprocess reused a stale port."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(config: TrainConfig, tokenizer, device: torch.device):
    torch.manual_seed(config.seed)  # same initial weights on every rank
    flamingo_config = model_config(
        vision=config.vision,
        lm=config.lm,
        image_size=config.image_size,
        cross_attn_every_n_layers=config.cross_attn_every_n_layers,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    model = build_flamingo(flamingo_config, tokenizer)
    check_sequence_length(config.max_tokens, model.lm)
    check_image_size(config.image_size, model.vision)
    if config.init_from is not None:
        path = config.init_from.removeprefix("openflamingo:")
        for note in load_openflamingo_checkpoint(model, path):
            if dist.get_rank() == 0:
                print(f"flamingo-data: note: {note}", file=sys.stderr)
    model = model.to(device)
    if config.fsdp:
        shard_model(model, config.precision)
    elif dist.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def check_sequence_length(max_tokens: int, lm: torch.nn.Module) -> None:
    """Refuse at start a --max-tokens the LM has no positions for: it would crash at the first
    long enough sample, possibly hours in."""
    limit = getattr(lm, "max_positions", None)
    if limit is not None and max_tokens > limit:
        raise StartError(
            f"`max_tokens` {max_tokens} is more than the language model's {limit} positions"
        )


def check_image_size(image_size: int, vision: torch.nn.Module) -> None:
    """Refuse at start an --image-size the vision encoder was not built for (a 224 px CLIP with the
    default 32): it would fail at the first batch, after the data pipeline had started."""
    expected = getattr(vision, "image_size", None)
    if expected is not None and image_size != expected:
        raise StartError(
            f"`image_size` {image_size} does not fit the vision encoder, which takes {expected} px"
            f" images: pass `image_size` {expected}"
        )


def shard_model(model, precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for layer in model.flamingo_layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model.resampler, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on trainable weight matrices (not gates, norms, biases, latents, embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            plain = param.ndim >= 2 and not any(m in name for m in NO_DECAY_MARKERS)
            (decay if plain else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def make_scheduler(optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then cosine/linear decay, counted in optimizer steps (so accumulation is accounted for)."""
    warmup, total = max(0, config.warmup_steps), max(1, config.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress if config.schedule == "linear" else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_dataset_kinds(config: TrainConfig) -> None:
    """A dataset given as one kind (``laion_shards``: pairs) must hold that kind, or every sample
    would be rejected one by one: the first record of its first shard is read to make sure."""
    for dataset in config.datasets:
        found = first_record_kind(dataset.shards) if dataset.kind != "auto" else None
        if found is not None and found != dataset.kind:
            raise StartError(
                f"dataset {dataset.name!r} is given as {dataset.kind} records but {dataset.shards}"
                f" holds {found} ones: give interleaved shards as `mmc4_shards`, pairs as"
                " `laion_shards`, GPT sequences as `gpt_shards`, or any as `dataset` NAME=auto:SPEC"
            )


def check_run_dir(config: TrainConfig, rank: int) -> None:
    """A run dir that holds a run is continued with ``resume`` only, since a fresh run there would
    mix its log and ``latest`` with the earlier run's; ``resume`` on a dir without a checkpoint
    says, once, that it starts fresh."""
    run_dir = Path(config.run_dir)
    if config.resume:
        if latest_checkpoint(run_dir) is None and rank == 0:
            print(f"{run_dir} holds no checkpoint to resume: starting a fresh run", file=sys.stderr)
        return
    checkpoints = run_dir / "checkpoints"
    if (run_dir / "log.jsonl").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        raise StartError(
            f"`run_dir` {run_dir} already holds a run: pass `resume` to continue it, or give a"
            " new `run_dir`"
        )


SOURCE_SUFFIXES = (".json", ".jsonl", ".zip", ".parquet")  # what the converters read


def check_shards(config: TrainConfig) -> None:
    """Every dataset names at least one shard, and a local first shard is a tar file: a source
    file (the LLaVA JSON, an MMC4 zip) given instead of the converted shards is refused here."""
    for dataset in config.datasets:
        named = [p for p in expand_specs(dataset.shards, keep_missing=True) if remote.exists(p)]
        given = dataset.shards
        if dataset.option == "dataset":
            given = f"{dataset.name}={dataset.kind}:{dataset.shards}"
        if not named:
            raise StartError(
                f"`{dataset.option}` {given} names no shard: give the .tar shards, or the folder"
                " a conversion wrote them to"
            )
        first = named[0]
        if not remote.is_remote(first) and not tarfile.is_tarfile(first):
            kind = next((s for s in SOURCE_SUFFIXES if first.lower().endswith(s)), None)
            what = f"a {kind} source file" if kind else "which is not a tar file"
            raise StartError(
                f"`{dataset.option}` {given} names {first}, {what}: training reads shards; convert"
                " it first (flamingo-data convert conversations, mmc4, chatgpt or laion) and give"
                " the folder that writes"
            )


def first_record_kind(shards: str) -> str | None:
    """The record kind of the first sample of the first shard ``shards`` names, or None when there
    is none to read (the loader reports why)."""
    for path in expand_specs(shards)[:1]:
        for sample in iter_samples(path, lambda issue: None, read=frozenset({"json"})):
            try:
                return record_kind(parse_json(sample.members.get("json") or b""))
            except Reject:  # not JSON: the loader counts it
                return None
    return None


def loader_pixels(device: torch.device) -> str:
    """uint8 batches for a GPU, normalized there (a quarter of the bytes to copy, no per-pixel
    work in the training process); on the CPU the loader's numpy normalisation is the fast one."""
    return "uint8" if device.type == "cuda" else "float"


def make_loaders(
    config: TrainConfig, tokenizer, rank: int, world: int, pixels: str = "float"
) -> dict[str, Any]:
    """One loader per dataset, so each gets its own loss weight (the paper's per-dataset lambda)."""
    loaders = {}
    for i, ds in enumerate(config.datasets):
        loader_config = LoaderConfig(
            batch_size=config.batch_size,
            num_workers=config.workers,
            seed=config.seed + i,
            max_tokens=config.max_tokens,
            max_images=config.max_images,
            image_size=config.image_size,
            sim_threshold=config.sim_threshold,
            pixels=pixels,
            loss_on=config.loss_on,
        )
        loaders[ds.name] = build_loader(
            [DatasetSpec(ds.name, ds.shards, ds.kind)], tokenizer, loader_config, rank, world
        )
    return loaders


class BatchStream:
    """Endless batches from one loader, moving to the next epoch when one ends."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._iter: Iterator | None = None

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None
                self.loader.set_epoch(self.loader.epoch + 1)
        raise EmptyDataset(
            f"dataset yields no usable sample: rejections {self.loader.rejections()}"
        )


def forward_loss(
    model, batch: dict[str, Any], device: torch.device, precision: str, fsdp: bool
) -> torch.Tensor:
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16" and not fsdp
        else nullcontext()
    )
    with autocast:
        out = model(
            model_vision(batch, device),
            batch["lang_x"].to(device),
            batch["attention_mask"].to(device),
            labels=batch["labels"].to(device),
        )
    return out.loss


def model_vision(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The batch's float32 ``vision_x`` on ``device``; uint8 batches are normalized there."""
    vision = batch["vision_x"].to(device, non_blocking=True)
    if vision.dtype != torch.uint8:
        return vision
    defaults = LoaderConfig()
    return normalize_vision(vision, batch["image_counts"], defaults.mean, defaults.std)


def train_step(
    model, streams: dict[str, BatchStream], config: TrainConfig, device, optimizer
) -> dict[str, Any]:
    """One optimizer step over ``grad_accum`` micro-steps, each taking one batch of every dataset."""
    losses = {name: 0.0 for name in streams}
    wait, samples, keys = 0.0, 0, []
    for _ in range(config.grad_accum):
        total = torch.zeros((), device=device)
        for name, stream in streams.items():
            start = time.perf_counter()
            batch = stream.next()
            wait += time.perf_counter() - start
            loss = forward_loss(model, batch, device, config.precision, config.fsdp)
            total = total + config.loss_weights.get(name, 1.0) * loss
            losses[name] += loss.item() / config.grad_accum
            samples += len(batch["keys"])
            keys += batch["keys"]
        (total / config.grad_accum).backward()
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return {
        "losses": losses,
        "data_wait_s": wait,
        "samples": samples,
        "keys": keys,
        "grad_norm": float(norm),
    }


def mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / dist.get_world_size()).tolist(), strict=True))


class RunLog:
    """Rank 0 writes one JSON line per logged step to stdout and ``<run_dir>/log.jsonl`` (+ wandb if asked)."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.active = rank == 0
        self.path = Path(config.run_dir) / "log.jsonl"
        self.wandb = None
        if self.active and config.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project="flamingo-data", dir=config.run_dir, config=vars(config)
                )
            except ImportError:
                print(
                    "wandb is not installed: logging to stdout and log.jsonl only", file=sys.stderr
                )

    def write(self, entry: dict[str, Any]) -> None:
        if not self.active:
            return
        line = json.dumps(entry)
        print(line, flush=True)
        with open(self.path, "a") as handle:
            handle.write(line + "\n")
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in entry.items() if isinstance(v, int | float)}, step=entry["step"]
            )


def fixed_batch_loss(model, config: TrainConfig, tokenizer, device, rank: int, world: int) -> float:
    """Loss on the first batch of the first dataset from a fresh loader (independent of the training stream)."""
    loader = make_loaders(config, tokenizer, rank, world, loader_pixels(device))[
        config.datasets[0].name
    ]
    batch = next(iter(loader), None)
    if batch is None:
        raise EmptyDataset(
            f"rank {rank}: dataset {config.datasets[0].name!r} yields no usable sample:"
            f" rejections {loader.rejections()}"
        )
    model.eval()
    with torch.no_grad():
        loss = forward_loss(model, batch, device, config.precision, config.fsdp)
    model.train()
    return mean_across_ranks({"loss": loss.item()}, device)["loss"]


CROSS_ATTN_PLACEMENT = "before blocks n-1, 2n-1, ... (open_flamingo's)"
RESUME_SETTINGS = ("vision", "lm", "tokenizer", "image_size", "cross_attn_every_n_layers", "seed")


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint only fits: the model (the tiny encoders' frozen weights come from the
    seed, not the checkpoint), the tokenizer, and the data streams the loader positions refer to."""
    settings: dict[str, Any] = {name: getattr(config, name) for name in RESUME_SETTINGS}
    settings["datasets"] = sorted(ds.name for ds in config.datasets)
    if config.cross_attn_every_n_layers > 1:  # a checkpoint without it placed other blocks
        settings["cross_attn_placement"] = CROSS_ATTN_PLACEMENT
    if config.init_from is not None:  # the LM's embedding rows come from it, not the checkpoint
        settings["init_from"] = config.init_from
    return settings


def refuse_other_settings(path: Path, saved: dict[str, Any] | None, config: TrainConfig) -> None:
    now = run_settings(config)
    if saved is not None and saved != now:
        changed = sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
        raise StartError(
            f"checkpoint {path} was written with other options ("
            + ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in changed)
            + "): resume with the same options, or use a new `run_dir`"
        )


def trainer_state(
    step: int, scheduler, loaders: dict[str, Any], config: TrainConfig
) -> dict[str, Any]:
    return {
        "step": step,
        "settings": run_settings(config),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "loaders": {name: loader.state_dict() for name, loader in loaders.items()},
    }


def restore(config: TrainConfig, model, optimizer, scheduler, loaders: dict[str, Any]) -> int:
    """Load the latest checkpoint if resuming; returns the step to continue from."""
    path = latest_checkpoint(config.run_dir) if config.resume else None
    if path is None:
        return 0
    saved = read_trainer_state(path)
    refuse_other_settings(path, saved.get("settings"), config)
    if int(saved["step"]) > config.steps:  # the loop would not run: nothing trained, exit 0
        raise StartError(
            f"checkpoint {path} is at step {saved['step']}, past `steps` {config.steps}:"
            f" pass `steps` {saved['step']} or more, or use a new `run_dir`"
        )
    # Loader positions fit only the layout and streams that wrote them (--workers, the datasets'
    # order, which seeds each one's stream): refused here, before the weights load, as one line.
    for name, loader in loaders.items():
        try:
            loader.load_state_dict(saved["loaders"][name])
        except ValueError as exc:
            raise StartError(
                f"checkpoint {path} does not fit dataset {name!r}: {exc} (here: the `workers`,"
                " shards and order of the datasets it was written with, or a new `run_dir`)"
            ) from None
    # The checkpoint brings back the optimizer's moments and the step; the rate and the weight
    # decay stay this run's options (they came back from the checkpoint, ignoring a new --lr).
    options = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    state = load_checkpoint(path, model, optimizer)
    scheduler.load_state_dict(state["scheduler"])
    scheduler.base_lrs = base_lrs
    for group, values in zip(optimizer.param_groups, options, strict=True):
        group.update(values)
    # The saved rate is the next step's under the checkpoint's --steps: recompute it under this
    # run's (a raised --steps would otherwise train one step at the old schedule's end, 0).
    scheduler.last_epoch -= 1
    scheduler.step()
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def run(config: TrainConfig) -> dict[str, Any]:
    """The training loop; returns a summary (first/last loss, fixed-batch loss before and after, steps)."""
    rank, world, device = setup_distributed()
    check_run_dir(config, rank)
    check_shards(config)
    check_dataset_kinds(config)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(config.tokenizer)
    model = build_model(config, tokenizer, device)
    optimizer, log = make_optimizer(model, config), RunLog(config, rank)
    scheduler = make_scheduler(optimizer, config)
    loaders = make_loaders(config, tokenizer, rank, world, loader_pixels(device))
    start = restore(config, model, optimizer, scheduler, loaders)
    streams = {name: BatchStream(loader) for name, loader in loaders.items()}
    summary: dict[str, Any] = {"start_step": start}
    if start == 0:
        summary["fixed_batch_loss_start"] = fixed_batch_loss(
            model, config, tokenizer, device, rank, world
        )
    model.train()
    step = start
    while step < config.steps and (config.stop_after is None or step - start < config.stop_after):
        began = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses; step() moves to the next one
        result = train_step(model, streams, config, device, optimizer)
        scheduler.step()
        step += 1
        entry = _log_entry(
            step, result, lr, loaders, time.perf_counter() - began, world, device, config
        )
        summary.setdefault("first_loss", entry["loss"])
        summary["last_loss"] = entry["loss"]
        if step % config.log_every == 0 or step == config.steps:
            log.write(entry)
        stopping = config.stop_after is not None and step - start == config.stop_after
        if step % config.checkpoint_every == 0 or step == config.steps or stopping:
            save_checkpoint(
                config.run_dir,
                step,
                model,
                optimizer,
                trainer_state(step, scheduler, loaders, config),
            )
    summary["steps"] = step
    if step == config.steps:
        summary["fixed_batch_loss_end"] = fixed_batch_loss(
            model, config, tokenizer, device, rank, world
        )
    log.write({"summary": summary, "step": step})
    return summary


def _log_entry(
    step, result, lr, loaders, seconds, world, device, config: TrainConfig
) -> dict[str, Any]:
    losses = mean_across_ranks(result["losses"], device)
    entry = {
        "step": step,
        "loss": sum(config.loss_weights.get(n, 1.0) * v for n, v in losses.items()),
        **{f"loss/{n}": v for n, v in losses.items()},
        "lr": lr,
        "grad_norm": result["grad_norm"],
        "samples_per_s": result["samples"] * world / max(seconds, 1e-9),
        "data_wait_s": result["data_wait_s"],
        "rejections": {name: loader.rejections() for name, loader in loaders.items()},
    }
    if config.log_keys:
        entry["keys"] = result["keys"]
    return entry


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train with the trainer's command-line options ``argv``; returns the run's summary."""
    return train(parse_args(argv))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train as ``config`` says (this process's rank under torchrun); returns the run's summary."""
    try:
        summary = run(config)
    except BaseException:
        # No barrier here: the other ranks may be inside a collective this rank will never join, and
        # both would wait out the process-group timeout (30 min). Exiting lets torchrun stop them.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    dist.barrier()  # no rank tears down gloo while another still uses it
    dist.destroy_process_group()
    return summary
