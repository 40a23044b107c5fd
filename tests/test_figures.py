"""Report figures: each one renders to a PNG from small synthetic tables and volumes; case choice and slice choice."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from workflow_scripts.evaluation import figures
from workflow_scripts.io.volumes import Geometry, write_volume

LABELS = [
    {"id": 1, "name": "Liver", "kind": "organ", "nsd_tolerance_mm": 5},
    {"id": 2, "name": "Spleen", "kind": "organ", "nsd_tolerance_mm": 3},
    {"id": 3, "name": "Lesion", "kind": "lesion", "nsd_tolerance_mm": 2},
]


def metrics_table(dsc: dict[str, list[float]]) -> pd.DataFrame:
    table = pd.DataFrame({"Name": dsc["Name"]})
    for entry in LABELS:
        table[f"{entry['name']}_DSC"] = dsc[entry["name"]]
        table[f"{entry['name']}_NSD"] = dsc[entry["name"]]
    return table


TABLE = metrics_table({"Name": ["a", "b", "c"], "Liver": [0.9, 0.95, 0.5], "Spleen": [0.8, 0.9, 0.2],
                       "Lesion": [0.0, 1.0, 0.4]})


def png_size(path: Path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    return image.shape[1], image.shape[0]


def test_best_and_worst_by_organ_mean_dsc():
    assert figures.best_and_worst(TABLE, ["Liver", "Spleen"]) == ("b", "c")
    assert figures.best_and_worst(TABLE, ["Lesion"]) == ("b", "a")


def test_display_slice_prefers_lesion_then_foreground():
    gt = np.zeros((6, 4, 4), np.uint8)
    gt[1:5, :, :] = 1
    gt[4, 1:3, 1:3] = 3
    assert figures.display_slice(gt, [3]) == 4
    gt[gt == 3] = 1
    gt[2, 0, 0] = 0
    assert figures.display_slice(gt, [3]) == 1  # most foreground, first of the ties


def test_voxel_count_parses_sizes():
    assert figures.voxel_count("512x512x55") == 512 * 512 * 55
    assert figures.voxel_count("(64, 64, 40)") == 64 * 64 * 40
    with pytest.raises(ValueError):
        figures.voxel_count("unknown")


def test_boxplots_and_efficiency_render(tmp_path):
    box_png = tmp_path / "box.png"
    figures.save(figures.dsc_boxplots({"two_stage": TABLE, "baseline": TABLE.assign(Liver_DSC=0.1)}, LABELS),
                 str(box_png), dpi=50)
    efficiency = pd.DataFrame({"Name": ["a", "b"], "Time": [1.0, 2.0], "MaxGPU_Mem": [900.0, 1000.0],
                               "AUC_GPU_Time": [800.0, 1900.0], "ImageSize": ["64x64x40", "64x64x80"],
                               "MemoryKind": ["rss", "rss"]})
    eff_png = tmp_path / "eff.png"
    figures.save(figures.efficiency_plot({"two_stage": efficiency, "teacher": efficiency}), str(eff_png), dpi=50)
    for png in (box_png, eff_png):
        width, height = png_size(png)
        assert width > 100 and height > 100


def test_qualitative_cli_renders_best_and_worst(tmp_path, capsys):
    geometry = Geometry((24, 20, 8), (0.8, 0.8, 2.5), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    cases, images, gts = ["a", "b", "c"], [], []
    for case in cases:
        image = rng.normal(0, 100, geometry.shape_zyx).astype(np.int16)
        gt = np.zeros(geometry.shape_zyx, np.uint8)
        gt[2:6, 4:14, 4:18] = 1
        gt[3, 6:9, 6:9] = 3
        images.append(str(tmp_path / "img" / f"{case}_0000.nii.gz"))
        gts.append(str(tmp_path / "gt" / f"{case}.nii.gz"))
        write_volume(images[-1], image, geometry)
        write_volume(gts[-1], gt, geometry)
        for experiment in ("baseline", "two_stage"):
            write_volume(tmp_path / experiment / f"{case}.nii.gz", np.roll(gt, 1, axis=2), geometry)
    rank = tmp_path / "metrics.tsv"
    TABLE.to_csv(rank, sep="\t", index=False)
    out = tmp_path / "report" / "qualitative.png"
    figures.main(["--dpi", "50", "qualitative", "--rank-metrics", str(rank), "--label-map", json.dumps(LABELS),
                  "--cases", *cases, "--images", *images, "--gt", *gts, "--experiments", "baseline", "two_stage",
                  "--pred-dirs", str(tmp_path / "baseline"), str(tmp_path / "two_stage"),
                  "--window", "-160", "240", "--output", str(out)])
    assert "best case b, worst case c" in capsys.readouterr().out
    width, height = png_size(out)
    assert width > 1.5 * height > 0  # 4 panels wide, 2 rows high (+ legend)
