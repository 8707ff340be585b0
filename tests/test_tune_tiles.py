"""``benchmarks/tune_tiles.py``'s decode grid (the sweep itself needs a GPU): ``--grid`` replaces
the choices of the fields it names and keeps the others'."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
tune_tiles = pytest.importorskip("tune_tiles")


def test_the_default_grid_times_every_tile_both_ways():
    grid = tune_tiles.decode_grid(False)
    assert len(grid) == 144 and len(set(grid)) == 144
    assert all(t.piece % t.block_n == 0 for t in grid)
    assert sum(t.centroid_scores for t in grid) == 72


def test_grid_replaces_the_named_fields_only():
    grid = tune_tiles.decode_grid(False, tune_tiles.grid_choices(["warps=1,2", "stages=2:1", "centroid_scores=False"]))
    assert {t.warps for t in grid} == {1, 2} and {t.stages for t in grid} == {(2, 1)}
    assert not any(t.centroid_scores for t in grid)
    assert {t.block_n for t in grid} == {32, 64, 128} and {t.waves for t in grid} == {2, 4, 8}


@pytest.mark.parametrize("item", ["heads=2", "warps=", "centroid_scores=yes"])
def test_a_bad_grid_item_stops_with_a_message(item):
    with pytest.raises(SystemExit, match="--grid"):
        tune_tiles.grid_choices([item])
