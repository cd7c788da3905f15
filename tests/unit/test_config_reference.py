"""docs/CONFIGURATION.md is the reference generated from the settings classes, up to date."""

from __future__ import annotations

from tritonrag.deploy.config_reference import OUTPUT, render


def test_the_configuration_reference_is_up_to_date() -> None:
    assert OUTPUT.read_text() == render(), "docs/CONFIGURATION.md is stale: regenerate it with `make docs`"
