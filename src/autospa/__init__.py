"""autospa: automated cryo-EM single-particle analysis (RELION-4.0 tools on torch, dask, Zarr and Prefect)."""

__version__ = "0.1.0"
