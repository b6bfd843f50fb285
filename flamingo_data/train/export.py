"""A run's trained weights as an OpenFlamingo ``checkpoint.pt`` (``flamingo-data export-openflamingo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from flamingo_data.errors import InputError
from flamingo_data.loader import make_tokenizer
from flamingo_data.model import build_flamingo, load_openflamingo_checkpoint, model_config
from flamingo_data.model.flamingo import Flamingo
from flamingo_data.model.openflamingo import save_openflamingo_checkpoint
from flamingo_data.train.checkpoint import check_metadata, check_model_keys, latest_checkpoint


def export_openflamingo(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the weights of ``source`` (a run folder: its latest checkpoint; or one checkpoint
    folder, ``RUN/checkpoints/step_N``) as an OpenFlamingo checkpoint at ``out``.

    The model is rebuilt from the run's own settings (vision tower, LM, tokenizer, cross-attention
    placement, and the OpenFlamingo checkpoint it started from, which holds the LM's embedding rows).
    Returns what was written: the checkpoint read, its step, the number of keys."""
    path = checkpoint_folder(Path(source))
    model, step = load_run_model(path)
    written = save_openflamingo_checkpoint(model, out)
    keys = len(torch.load(written, map_location="cpu", weights_only=True))
    return {"checkpoint": str(path), "step": step, "out": str(written), "keys": keys}


def checkpoint_folder(source: Path) -> Path:
    if (source / ".metadata").exists():
        return source
    if not source.is_dir():
        raise InputError(f"`source` {source} is neither a run folder nor a checkpoint folder")
    path = latest_checkpoint(source)
    if path is None:
        raise InputError(f"`source` {source} holds no checkpoint (no checkpoints/latest)")
    return path


def load_run_model(path: Path) -> tuple[Flamingo, int]:
    """The run's model with the trained weights of checkpoint ``path``, and its step."""
    saved = torch.load(path / "trainer_rank0.pt", map_location="cpu", weights_only=True)
    settings = saved.get("settings") or {}
    if "lm" not in settings:
        raise InputError(f"checkpoint {path} records no settings to rebuild its model from")
    config = model_config(
        vision=settings["vision"],
        lm=settings["lm"],
        image_size=settings["image_size"],
        cross_attn_every_n_layers=settings["cross_attn_every_n_layers"],
    )
    model = build_flamingo(config, make_tokenizer(settings["tokenizer"]))
    if settings.get("init_from"):
        load_openflamingo_checkpoint(model, settings["init_from"].removeprefix("openflamingo:"))
    check_metadata(path)
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    check_model_keys(path, {name: tuple(t.shape) for name, t in trained.items()})
    dcp.load({"model": trained}, checkpoint_id=str(path))
    return model, int(saved["step"])
