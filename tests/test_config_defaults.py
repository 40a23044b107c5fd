"""The schema defaults filled without Snakemake are exactly those Snakemake's validator fills."""
from __future__ import annotations

import copy

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO, TINY_CONFIG
from workflow_scripts.io.config_defaults import SCHEMA, config_with_defaults

CONFIGS = {
    "empty": {},
    "demo": yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
    "gpu_demo": yaml.safe_load((REPO / "config" / "gpu_demo.yaml").read_text()),
    "tiny": yaml.safe_load(TINY_CONFIG.read_text()),
    "nested": {"postprocess": {"per_class": {"9": {"keep_largest": 1}}},
               "student": {"experiments": {"nn": {"labels": "raw"}}}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_equal_snakemakes(name: str) -> None:
    expected = copy.deepcopy(CONFIGS[name])
    validate(expected, str(SCHEMA), set_default=True)
    assert config_with_defaults(CONFIGS[name]) == expected


def test_the_given_config_and_the_schema_are_not_modified() -> None:
    config = {"student": {"c2f": {"epochs": 3}}}
    first = config_with_defaults(config)
    first["student"]["c2f"]["channels"].append(999)
    first["labels"].clear()
    assert config == {"student": {"c2f": {"epochs": 3}}}
    second = config_with_defaults(config)
    assert 999 not in second["student"]["c2f"]["channels"] and second["labels"]
