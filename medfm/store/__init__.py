"""Where medfm keeps its work: HDF5 feature stores and the SQLite results registry."""
