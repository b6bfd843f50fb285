"""Checkpoints: trainable weights + optimizer via torch.distributed.checkpoint (sharded, FSDP2-aware),
plus per-rank trainer state (step, scheduler, RNG, loader positions). Directories are committed
atomically: written as ``step_N.tmp``, renamed, then ``latest`` points at them.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from flamingo_data.storage.atomic import write_atomic
from flamingo_data.train.config import StartError


def _trainable_model_state(model: torch.nn.Module) -> dict[str, Any]:
    # get_model_state_dict names parameters without DDP's "module." prefix: match it, or a DDP run
    # would save (and silently "restore") no weights at all.
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
    state = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    if not state:
        raise RuntimeError(
            "no trainable parameters found in the model state: nothing to checkpoint"
        )
    return state


def save_checkpoint(
    run_dir: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any]
) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = {
        "model": _trainable_model_state(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(trainer_state, tmp / f"trainer_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name.encode())
    dist.barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        # resuming from step 0 here would silently throw the run's progress away
        raise StartError(
            f"{pointer} names {path.name}, which is not there: restore that folder, or delete "
            "the pointer to start the run over"
        )
    return path


# What torch.distributed.checkpoint's ``.metadata`` pickle names: its own records, sizes, dtypes,
# layouts and the path of the save. dcp.load unpickles the file with plain ``pickle.load``.
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def check_metadata(path: Path) -> None:
    """Unpickle the checkpoint's metadata files building only what DCP writes there, before
    dcp.load unpickles them unrestricted: a crafted ``.metadata`` ran its code on --resume."""
    for file in (path / ".metadata", *path.glob("__*.metadata")):
        if not file.exists():
            continue
        try:
            with open(file, "rb") as handle:
                _MetadataUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise StartError(f"checkpoint {file} is not metadata DCP writes: {exc}") from exc


def check_model_keys(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose weights are not the model's (name -> shape): dcp.load would skip a
    weight the model lacks silently, and fail with a traceback on one it lacks or sizes otherwise."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {
        key.removeprefix("model."): tuple(getattr(entry, "size", ()))
        for key, entry in metadata.items()
        if key.startswith("model.")
    }
    extra = sorted(saved.keys() - shapes.keys())
    missing = sorted(shapes.keys() - saved.keys())
    resized = sorted(k for k in saved.keys() & shapes.keys() if saved[k] != tuple(shapes[k]))
    if extra or missing or resized:
        name = (extra or missing or resized)[0]
        what = "holds" if extra else "lacks" if missing else "holds another shape of"
        raise StartError(
            f"checkpoint {path} {what} `{name}`, unlike this version's model (its resampler and"
            " added tokens are open_flamingo's, see CHANGELOG): finish that run with the"
            " flamingo-data version that wrote it, or start a new `run_dir`"
        )


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    """Restore weights and optimizer in place; returns this rank's trainer state (weights_only load)."""
    check_metadata(path)
    state = {
        "model": _trainable_model_state(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    check_model_keys(path, {name: tuple(t.shape) for name, t in state["model"].items()})
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return read_trainer_state(path)


def read_trainer_state(path: Path) -> dict[str, Any]:
    """This rank's step, scheduler, RNG and loader positions (weights_only: no pickled code)."""
    saved, world = len(list(path.glob("trainer_rank*.pt"))), dist.get_world_size()
    if saved != world:  # every rank refuses, before any collective: none waits for another
        raise StartError(
            f"checkpoint {path} was written by {saved} processes and this run has {world}: the"
            " loader positions are per process, resume with the same number of processes"
        )
    return torch.load(path / f"trainer_rank{dist.get_rank()}.pt", weights_only=True)
