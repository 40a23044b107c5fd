"""The conda environments used by `snakemake --use-conda` must pin exactly what the tested lock file pins."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        for spec in dep["pip"] if isinstance(dep, dict) else []:
            name, _, version = spec.partition("==")
            assert version, f"{path.name}: {spec!r} is not pinned with =="
            pins[normalise(name)] = version
    return pins


ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.name)
def test_env_pins_match_lock(env_file: Path) -> None:
    lock = lock_pins()
    pins = env_pins(env_file)
    assert pins, f"{env_file.name} pins nothing"
    for name, version in pins.items():
        assert name in lock, f"{env_file.name}: {name} is not in requirements.lock"
        assert lock[name] == version, f"{env_file.name}: {name}=={version} but requirements.lock has {lock[name]}"


def test_every_conda_directive_names_an_existing_env() -> None:
    referenced = set()
    for rule_file in (REPO / "rules").glob("*.smk"):
        referenced |= set(re.findall(r'conda:\s*\n?\s*"([^"]+)"', rule_file.read_text()))
    for ref in referenced:
        assert (REPO / "rules" / ref).resolve().is_file(), f"conda env {ref} referenced in rules/ does not exist"
    assert {Path(ref).name for ref in referenced} <= {p.name for p in ENV_FILES}
