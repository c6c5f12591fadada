"""Data the defaults need, shipped inside the package and found wherever it is installed.

- `rules_dir()`: the built-in sharding rules, `jaxserve/sharding_rules/NAME.yaml` (`--rules tp`);
- `embedded_model()`: the embedded tiny model, `jaxserve/checkpoints/tiny` (what `generate`
  and `serve` run without `--model`; written by scripts/train_tiny.py);
- `embedded_draft()`: its 1-layer draft for speculative decoding, `jaxserve/checkpoints/
  tiny-draft` (the default draft of method 'draft'; `scripts/train_tiny.py --draft`);
- `latent_calibration_text()`: the default calibration text of latent_transform 'pca',
  `jaxserve/text/latent_calibration.txt` (prose, code, arithmetic: a mix of what models read).

All are read through `importlib.resources`, the one place that knows where they are, and are
declared as package data in pyproject.toml (tests/test_package_data.py checks the wheel holds
them). This module must never import jax.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _package_dir(*parts: str) -> Path:
    """A directory of package data as a file-system path (orbax and globbing need one)."""
    found = resources.files("jaxserve").joinpath(*parts)
    if not isinstance(found, Path):
        raise FileNotFoundError(f"jaxserve's {'/'.join(parts)} is not on the file system "
                                f"({found!r}): install jaxserve as files, not as a zip")
    return found


def rules_dir() -> Path:
    return _package_dir("sharding_rules")


def embedded_model() -> Path:
    return _package_dir("checkpoints", "tiny")


def embedded_draft() -> Path:
    return _package_dir("checkpoints", "tiny-draft")


def latent_calibration_text() -> Path:
    return _package_dir("text") / "latent_calibration.txt"
