"""flamingo-data: multimodal web data -> WebDataset shards -> Flamingo batches."""

__version__ = "0.1.0"
