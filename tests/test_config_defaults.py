"""The schema defaults filled without Snakemake are exactly those Snakemake's validator fills."""
from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO, TINY_CONFIG, output_of, run_workflow, write_config
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


def _teacher_command(dry_run: str) -> str:
    return next(line for line in dry_run.splitlines() if "nnunet.teacher configure" in line)


def test_a_configfile_replaces_the_demo_config_and_the_schema_fills_what_it_leaves_out(tmp_path, raw_dataset) -> None:
    """config/flare23.yaml sets paths only: its teacher must get nnU-Net's 1000 epochs, not the demo's 75, which
    Snakemake's own layering onto config/config.yaml would hand it. Two files still merge, the later on top."""
    workdir = tmp_path / "run"  # holds config/config.yaml, as the repository does for a run started there
    (workdir / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "config.yaml", workdir / "config" / "config.yaml")
    config = write_config(tmp_path / "config.yaml", raw_dataset)
    settings = yaml.safe_load(config.read_text())
    del settings["teacher"]["epochs"]
    config.write_text(yaml.safe_dump(settings))
    dry_run = output_of(run_workflow(workdir, "--dry-run", "--printshellcmds", config=config))
    assert "--epochs 1000 " in _teacher_command(dry_run)
    assert "extended by additional config" not in dry_run
    changes = tmp_path / "changes.yaml"
    changes.write_text(yaml.safe_dump({"teacher": {"epochs": 7}}))
    dry_run = output_of(run_workflow(workdir, "--dry-run", "--printshellcmds", "--configfile", str(config),
                                     str(changes), config=config))
    assert "--epochs 7 --iterations-per-epoch 2 " in _teacher_command(dry_run)
