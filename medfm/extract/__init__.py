"""The extract stage: embed every split of a dataset with a frozen backbone, once, into a store."""

from medfm.extract.extractor import ExtractResult, extract, extract_request, release_models

__all__ = ["ExtractResult", "extract", "extract_request", "release_models"]
