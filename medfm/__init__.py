"""medfm: which pretrained vision backbone, used how, works best on your medical images.

Stages (each a plain function, each also a `medfm` CLI verb):
extract -> HDF5 feature stores -> probe -> results registry <- finetune; report reads the registry.
"""

from medfm.errors import MedfmError

__version__ = "0.1.0"

__all__ = ["MedfmError", "__version__"]
