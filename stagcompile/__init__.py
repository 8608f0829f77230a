"""stagcompile: a deployment compiler for StagFormer language models."""

from stagcompile.runtime.bundle import VERSION as __version__  # the runtime carries it into bundles

__all__ = ["__version__"]
