"""The project's Detectron2 config: Detectron2's defaults plus every ``add_*_config`` of tbd.

The keys and the YAML reading are in :mod:`tbd.config_keys` (importable by the distiller); this
module adds the registration of ``TBDistiller`` on top, so a config from here builds any tbd model.
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode as CN

from tbd.config_keys import (  # noqa: F401  (the public names of tbd.config)
    CONFIG_DIR,
    PROJECT_ROOT,
    add_all_config,
    add_project_config,
    load_model_config,
    model_cfg,
    register_models,
    resolve_config_path,
)


def register_all() -> None:
    """Register every tbd meta-architecture (heads and ``TBDistiller``) in Detectron2's registry.

    Needed in any process that builds a model from a config, e.g. each ``launch`` worker.
    """
    import tbd.distill  # noqa: F401

    register_models()


def get_cfg() -> CN:
    """Detectron2's default config with all tbd keys added (and every tbd model registered)."""
    register_all()
    return model_cfg()


def load_config(path: str | Path, opts: list[str] | None = None) -> CN:
    register_all()
    return load_model_config(path, opts)
