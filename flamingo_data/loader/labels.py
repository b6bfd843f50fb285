"""Labels for next-token loss, computed once in the loader so the trainer never re-derives them."""

from __future__ import annotations

import torch

IGNORE = -100


def make_labels(input_ids: torch.Tensor, image_id: int, eoc_id: int, pad_id: int) -> torch.Tensor:
    """-100 on padding, on ``<image>``, before the first ``<image>``, and from after each
    ``<|endofchunk|>`` up to the next ``<image>`` (so the model never learns to predict what comes
    between documents' chunks, nor the image tokens themselves). Works on [T] or [B, T]."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    labels = ids.clone()
    for row in range(ids.shape[0]):
        masked = True  # before the first <image>
        for col in range(ids.shape[1]):
            token = int(ids[row, col])
            if token == image_id:
                masked = False
                labels[row, col] = IGNORE
                continue
            if masked or token == pad_id:
                labels[row, col] = IGNORE
            if token == eoc_id:
                masked = True
    return labels if input_ids.dim() == 2 else labels[0]
