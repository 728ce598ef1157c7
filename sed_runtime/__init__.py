"""Torch-free SED runtime: pre/post-processing, backends behind one interface, the pipeline and `sed-run`."""

__version__ = "0.1.0"
