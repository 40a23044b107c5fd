"""The workflow's configuration with the schema's defaults filled in, without Snakemake or jsonschema.

The Snakefile fills every default of ``config/schema.yaml`` through ``snakemake.utils.validate``. The benchmark
scripts need the same values outside the workflow, also on a GPU machine that has neither package (it is given only
the wheels of nnU-Net and the image readers, see ``bench/gpu_suite.sh``), so :func:`fill_defaults` applies the
defaults the way Snakemake's validator does: wherever an object schema lists ``properties``, each one with a
``default`` is set when missing, then the walk goes on into the values (``properties``, ``patternProperties``,
``additionalProperties``, array ``items``). It does not validate; the workflow itself still does.
"""
from __future__ import annotations

import re
from copy import deepcopy
from pathlib import Path
from typing import Any, Mapping

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def fill_defaults(instance: Any, schema: Mapping) -> Any:
    """Set the defaults ``schema`` declares on ``instance`` in place (missing keys only), and return it."""
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for name, subschema in properties.items():
            if "default" in subschema and name not in instance:
                instance[name] = deepcopy(subschema["default"])
        patterns = schema.get("patternProperties", {})
        additional = schema.get("additionalProperties")
        for name, value in instance.items():
            matching = [sub for pattern, sub in patterns.items() if re.search(pattern, name)]
            if name in properties:
                matching.append(properties[name])
            elif not matching and isinstance(additional, Mapping):
                matching.append(additional)
            for subschema in matching:
                fill_defaults(value, subschema)
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        for item in instance:
            fill_defaults(item, schema["items"])
    return instance


def config_with_defaults(config: Mapping | None = None, schema_path: str | Path = SCHEMA) -> dict:
    """A copy of ``config`` (default: empty, i.e. the full-size defaults) with the schema's defaults filled in."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    return fill_defaults(deepcopy(dict(config or {})), schema)
