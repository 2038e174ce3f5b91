"""Strata's built-in model: a small Llama trained on a bundled public-domain corpus (the King
James Bible), so that a fresh machine has a real model to serve with no downloads.

``MODEL_DIR`` is the shipped checkpoint (HF format, with ``training_record.json``);
``train.main(argv)`` is what ``strata train`` runs to reproduce it. See README.md.

This module is the model's name and paths, and nothing else: model-store and the CLI import it
without the training code (which needs torch).
"""

from pathlib import Path

BUILTIN_DIR = Path(__file__).resolve().parent
MODEL_DIR = BUILTIN_DIR / "model"
CORPUS_DIR = BUILTIN_DIR / "corpus"
MODEL_NAME = "strata-builtin-kjv"

__all__ = ["BUILTIN_DIR", "CORPUS_DIR", "MODEL_DIR", "MODEL_NAME"]
