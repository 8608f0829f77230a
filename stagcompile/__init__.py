"""stagcompile: a deployment compiler for StagFormer language models."""

__version__ = "0.1.0"
