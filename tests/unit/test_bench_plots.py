"""bench/plots.py renders bench/README.md's figures from bench/results/*.json (no benchmark is run here)."""
from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plots() -> ModuleType:
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("bench_plots", BENCH / "plots.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    return w, h


def test_record_merges_and_render_writes_png(plots: ModuleType, tmp_path: Path) -> None:
    res, out = tmp_path / "results", tmp_path / "img"
    plots.record("sync", "sync_time", "mode a", {"1000": 0.5, "10000": [4.0, 5.0, 7.0]}, "run 1",
                 results=res, kind="line", title="t", x_label="Services", y_label="s", log_x=True, log_y=True)
    plots.record("sync", "sync_time", "mode b", {"1000": 2.0}, "run 1", results=res)
    # A later run of one size updates that point only and keeps the other series.
    plots.record("sync", "sync_time", "mode a", {"1000": 0.4}, "run 2", results=res)
    data = json.loads((res / "sync.json").read_text())
    fig = data["figures"]["sync_time"]
    assert fig["log_x"] is True and fig["kind"] == "line"
    assert fig["series"]["mode a"] == {"measured": "run 2", "points": {"1000": 0.4, "10000": [4.0, 5.0, 7.0]}}
    assert fig["series"]["mode b"]["points"] == {"1000": 2.0}
    plots.record("qps", "qps_bar", "server", {"x": 3.0, "y": [1.0, 2.0, 3.0]}, "run 1", results=res, kind="bar")
    written = plots.render(res, out)
    assert sorted(p.name for p in written) == ["qps_bar.png", "sync_time.png"]
    for p in written:
        w, h = _png_size(p)
        assert w >= 600 and h >= 300


def test_mid_range_is_median_with_min_max(plots: ModuleType) -> None:
    assert plots._mid_range([3.0, 1.0, 2.0, 10.0]) == (1.0, 2.5, 10.0)
    assert plots._mid_range(4) == (4.0, 4.0, 4.0)


def test_readme_embeds_existing_pngs_for_every_figure(plots: ModuleType, tmp_path: Path) -> None:
    readme = (BENCH / "README.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)\s]+\.png)\)", readme)
    assert embedded, "bench/README.md embeds no plot"
    for rel in embedded:
        assert (BENCH / rel).is_file(), f"bench/README.md embeds {rel}, which does not exist"
        _png_size(BENCH / rel)
    # Every figure in the committed results renders, and the README shows each one.
    rendered = plots.render(BENCH / "results", tmp_path)
    assert rendered
    names = {Path(rel).name for rel in embedded}
    missing = [p.name for p in rendered if p.name not in names]
    assert not missing, f"figures with results but not in bench/README.md: {missing}"
