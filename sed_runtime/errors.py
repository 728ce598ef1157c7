"""User-facing errors: every CLI turns these into one line and exit code 2, never a traceback.

The Python API raises the same exceptions with the same one-line messages. Catch `SedUserError` for all of them,
or one of its subclasses for one kind of bad input:

- `BundleError`: a bundle is missing, damaged (a file fails its sha256), or was built for something else.
- `ImageError`: an image cannot be read, or its mode or size cannot be processed.
- `VocabularyError`: a vocabulary, class list, template set or tokenizer input is unusable.
- `ModelError`: a model config or checkpoint is unknown, malformed or does not fit the model.
- `DatasetError`: an evaluation dataset (images and label maps) is inconsistent.
- `OutputError`: an output location is unusable or would overwrite files without `--force`.
- `MemoryBudgetError`: the run would need more memory than is free (or than `--max-memory`).
"""

from __future__ import annotations

__all__ = ["BundleError", "DatasetError", "ImageError", "MemoryBudgetError", "ModelError", "OutputError",
           "SedUserError", "VocabularyError"]


class SedUserError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix in one line."""


class BundleError(SedUserError):
    """A bundle is missing, damaged or built for something else."""


class ImageError(SedUserError):
    """An image cannot be read or processed."""


class VocabularyError(SedUserError):
    """A vocabulary, class list, template set or tokenizer input is unusable."""


class ModelError(SedUserError):
    """A model config or checkpoint is unknown, malformed or does not fit."""


class DatasetError(SedUserError):
    """An evaluation dataset is inconsistent (labels missing, of another size, or outside the vocabulary)."""


class OutputError(SedUserError):
    """An output location is unusable, or would overwrite files without --force."""


class MemoryBudgetError(SedUserError):
    """The run's predicted peak memory is above the budget (free memory, or --max-memory)."""
