"""Labels for next-token loss, computed once in the loader so the trainer never re-derives them."""

from __future__ import annotations

import torch

IGNORE = -100


def make_labels(input_ids: torch.Tensor, image_id: int, eoc_id: int, pad_id: int) -> torch.Tensor:
    """-100 on padding, on ``<image>``, before the first ``<image>``, and from after each
    ``<|endofchunk|>`` up to the next ``<image>`` (so the model never learns to predict what comes
    between chunks, nor the image tokens themselves). Works on [T] or [B, T]; vectorised."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    none = torch.full_like(positions, -1)
    last_image = torch.where(ids == image_id, positions, none).cummax(dim=1).values
    last_eoc = torch.where(ids == eoc_id, positions, none).cummax(dim=1).values
    eoc_before = torch.cat((none[:, :1], last_eoc[:, :-1]), dim=1)  # strictly before this token
    masked = (last_image < 0) | (eoc_before > last_image) | (ids == image_id) | (ids == pad_id)
    labels = ids.masked_fill(masked, IGNORE)
    return labels if input_ids.dim() == 2 else labels[0]
