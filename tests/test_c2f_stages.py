"""The c2f student's stages measured apart: does the coarse box hold the foreground, DSC inside vs whole case."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import c2f_stages as stages
from workflow_scripts.c2f.predict import BOX_COLUMNS, box_row
from workflow_scripts.io.volumes import Geometry, write_volume

LABELS = [{"id": 1, "name": "Liver", "kind": "organ"}, {"id": 2, "name": "Lesion", "kind": "lesion"}]
GEOMETRY = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_a_box_that_cuts_the_organ_is_reported_and_scored_apart_from_the_whole_case() -> None:
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:8, 2:8, 2:8] = 1
    prediction = truth.copy()
    prediction[6:8] = 0  # the fine stage could not see beyond the box
    box = (slice(0, 6), slice(0, 10), slice(0, 10))
    row = stages.stage_row("c", truth, prediction, box, [1], [2])
    assert row["box_holds_foreground"] is False and row["foreground_in_box"] == pytest.approx(4 / 6)
    assert row["organ_dsc_in_box"] == 1.0 and row["organ_dsc_case"] == pytest.approx(2 * 4 / 10)
    assert np.isnan(row["lesion_dsc_case"])
    whole = stages.stage_row("c", truth, truth, None, [1], [2])
    assert whole["box"] == "whole volume" and whole["box_holds_foreground"] is True


def test_cli_joins_the_shards_boxes_with_the_predictions(tmp_path) -> None:
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[3:6, 3:6, 3:6] = 1
    for name in ("gt", "pred"):
        write_volume(tmp_path / f"{name}.nii.gz", truth, GEOMETRY)
    pd.DataFrame([box_row("a", (slice(2, 7), slice(2, 7), slice(2, 7))), box_row("b", None)],
                 columns=BOX_COLUMNS).to_csv(tmp_path / "boxes.tsv", sep="\t", index=False)
    paths = [str(tmp_path / "gt.nii.gz")] * 2
    stages.main(["--cases", "a", "b", "--gt", *paths, "--pred", *[str(tmp_path / "pred.nii.gz")] * 2,
                 "--boxes", str(tmp_path / "boxes.tsv"), "--label-map", json.dumps(LABELS),
                 "--output", str(tmp_path / "out.tsv")])
    table = pd.read_csv(tmp_path / "out.tsv", sep="\t")
    assert table["box"].tolist() == ["2:7 2:7 2:7", "whole volume"]
    assert table["box_holds_foreground"].all() and (table["organ_dsc_in_box"] == 1).all()
    with pytest.raises(SystemExit, match="'c'.*no box"):
        stages.main(["--cases", "c", "--gt", paths[0], "--pred", paths[0], "--boxes", str(tmp_path / "boxes.tsv"),
                     "--label-map", json.dumps(LABELS), "--output", str(tmp_path / "x.tsv")])
