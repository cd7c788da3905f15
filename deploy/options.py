"""What every ``tritonrag`` command shares: the ``--config`` option and the settings it loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tritonrag.server.config import Settings

ConfigOption = Annotated[Path | None, typer.Option("--config", help="YAML settings file (env TRITONRAG_* wins).")]


def load_settings(config: Path | None) -> Settings:
    """The settings from ``config`` (and the environment); a bad file is a usage error naming ``--config``."""
    try:
        return Settings.load(config)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
