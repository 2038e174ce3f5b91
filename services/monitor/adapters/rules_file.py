"""The alert rules file (YAML): read here, checked by the domain (domain/alerts.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.monitor.domain.alerts import Rule, parse_rules
from shared import errors


def load_rules(path: Path) -> list[Rule]:
    """The rules of a YAML file; a bad file is a clear error naming the file and the field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise errors.Invalid(f"cannot read alert rules from {path}: {exc}") from None
    return parse_rules(raw, str(path))
