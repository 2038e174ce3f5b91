"""Strata's built-in model: a small Llama trained on a bundled public-domain corpus (the King
James Bible), so that a fresh machine has a real model to serve with no downloads.

``MODEL_DIR`` is the shipped checkpoint (HF format, with ``training_record.json``);
``train.main(argv)`` is what ``strata train`` runs to reproduce it. See README.md.
"""

from .train import HERE as BUILTIN_DIR
from .train import MODEL_NAME
from .train import SHIPPED_MODEL_DIR as MODEL_DIR

__all__ = ["BUILTIN_DIR", "MODEL_DIR", "MODEL_NAME"]
