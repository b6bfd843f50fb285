"""flamingo-data: multimodal web data -> WebDataset shards -> Flamingo batches.

The public API below is exported lazily (PEP 562): ``import flamingo_data`` imports none of it, and
each name imports its module on first use, so the command line and workers start fast and a core
install (no extras) can use every name whose feature needs no extra.
"""

from __future__ import annotations

from flamingo_data.core.extras import lazy_exports as _lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "convert_mmc4": "flamingo_data.converters.mmc4",
    "Mmc4Options": "flamingo_data.converters.mmc4",
    "convert_laion": "flamingo_data.converters.laion",
    "LaionOptions": "flamingo_data.converters.laion",
    "convert_chatgpt": "flamingo_data.converters.chatgpt",
    "ChatGptOptions": "flamingo_data.converters.chatgpt",
    "convert_conversations": "flamingo_data.converters.conversations",
    "ConversationOptions": "flamingo_data.converters.conversations",
    "convert_obelics": "flamingo_data.converters.obelics",
    "ObelicsOptions": "flamingo_data.converters.obelics",
    "UrlImages": "flamingo_data.fetch.url_images",
    "RunOptions": "flamingo_data.run.units",
    "Execution": "flamingo_data.run.executors",
    "DownloadOptions": "flamingo_data.fetch.i2d_run",
    "ImagePolicy": "flamingo_data.images.stage",
    "validate_shards": "flamingo_data.check.validate",
    "ValidateOptions": "flamingo_data.check.validate",
    "inspect_shards": "flamingo_data.check.inspect",
    "write_preview": "flamingo_data.check.preview",
    "build_loader": "flamingo_data.loader.pipeline",
    "LoaderConfig": "flamingo_data.loader.config",
    "DatasetSpec": "flamingo_data.loader.config",
    "make_tokenizer": "flamingo_data.loader.tokenizer",
    "build_flamingo": "flamingo_data.model.build",
    "FlamingoConfig": "flamingo_data.model.flamingo",
    "model_config": "flamingo_data.model.openflamingo",
    "load_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
    "save_openflamingo_checkpoint": "flamingo_data.model.openflamingo",
    "export_openflamingo": "flamingo_data.train.export",
    "run_demo": "flamingo_data.demo.run",
    "FlamingoDataError": "flamingo_data.errors",
    "InputError": "flamingo_data.errors",
    "RunError": "flamingo_data.errors",
}

__all__ = ["__version__", *_EXPORTS]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
