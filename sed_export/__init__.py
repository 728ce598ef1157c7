"""SED export side: the faithful PyTorch reference, model configs, checkpoints, text embeddings, exporters."""

__version__ = "0.1.0"
