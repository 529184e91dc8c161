"""The README's table of step settings is the settings models' own: it cannot drift."""

from __future__ import annotations

import pytest

from handlers.cache import CacheSettings
from handlers.checks import NEEDS
from handlers.sandbox import SandboxSettings
from handlers.settings_doc import README, in_readme, rows, table

pytestmark = pytest.mark.unit

MODELS = {needs.model for needs in NEEDS.values()} | {SandboxSettings, CacheSettings}


def test_the_readme_table_is_the_one_the_models_make() -> None:
    assert in_readme(README.read_text(encoding="utf-8")) == table(), (
        "README.md's step settings table is out of date: run "
        "`python -m handlers.settings_doc --write`")


def test_every_setting_of_every_step_is_in_the_table_and_explained() -> None:
    listed = {(variable, meaning) for variable, _, _, meaning in rows()}
    for model in MODELS:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"
            assert f"CISTATE_{name.upper()}" in {variable for variable, _ in listed}
    for variable in ("CISTATE_HEALTH_PORT", "CISTATE_BUILDER_ROOT", "CISTATE_BUILDER_RUNROOT",
                     "CISTATE_INGRESS_SUBDOMAIN", "CISTATE_CHART_DIR",
                     "CISTATE_ROLLOUT_INTERVAL"):
        assert any(row[0] == variable and row[3] for row in rows()), variable
