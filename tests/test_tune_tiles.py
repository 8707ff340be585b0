"""``benchmarks/tune_tiles.py``'s decode grid (the sweep itself needs a GPU): ``--grid`` replaces
the choices of the fields it names and keeps the others'."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
tune_tiles = pytest.importorskip("tune_tiles")


def test_the_default_grid_times_every_tile():
    grid = tune_tiles.decode_grid(False)
    assert len(grid) == 72 and len(set(grid)) == 72
    assert all(t.piece % t.block_n == 0 for t in grid)


def test_grid_replaces_the_named_fields_only():
    grid = tune_tiles.decode_grid(False, tune_tiles.grid_choices(["warps=1,2", "stages=2:1"]))
    assert {t.warps for t in grid} == {1, 2} and {t.stages for t in grid} == {(2, 1)}
    assert {t.block_n for t in grid} == {32, 64, 128} and {t.waves for t in grid} == {2, 4, 8}
    assert {t.maxnreg for t in grid} == {None}


def test_a_register_cap_is_a_grid_field():
    grid = tune_tiles.decode_grid(False, tune_tiles.grid_choices(["maxnreg=none,128", "block_n=64"]))
    assert {t.maxnreg for t in grid} == {None, 128} and len(grid) == 2 * 72 // 3


@pytest.mark.parametrize("item", ["heads=2", "warps=", "waves=many", "stages=2:x", "maxnreg=all", "key_scores=yes", "key_scores=true"])
def test_a_bad_grid_item_stops_with_a_message(item):
    with pytest.raises(SystemExit, match="--grid"):
        tune_tiles.grid_choices([item])


def test_rescore_picks_a_winner_for_a_class_of_keys_without_a_gpu(monkeypatch, tmp_path):
    """``--rescore`` re-picks the winner of an earlier sweep over the cases of ``--policies`` and
    ``--keys`` names the class of keys of the table row it writes; other rows stay."""
    fast_plain = {"block_n": 128, "piece": 512, "max_rows": 64, "warps": 4, "stages": [1], "waves": 16,
                  "maxnreg": 128}
    fast_smoothed = {**fast_plain, "warps": 2, "maxnreg": None}
    # an option this qkv no longer has: left off it is dropped, set it leaves its tile out
    gone_off, gone_on = {**fast_plain, "retired": False}, {**fast_smoothed, "waves": 8, "retired": True}
    earlier = {"environment": {"gpu": "Some GPU"}, "kernel": "decode", "tiles": [gone_off, fast_smoothed, gone_on],
               "cases": [{"case": [1, 32768, 1, "qvg"], "ms": [0.06, 0.05, 0.01]},
                         {"case": [1, 32768, 1, "rtn"], "ms": [0.03, 0.04, 0.01]}]}
    sweep, table, out = tmp_path / "sweep.json", tmp_path / "tiles.json", tmp_path / "out.json"
    sweep.write_text(json.dumps(earlier))
    many = {"up_to": None, "block_n": 64, "piece": 256, "max_rows": 64, "warps": 4, "stages": [1], "waves": 8}
    table.write_text(json.dumps({"Some GPU": {"decode": [many]}}))
    for policy, keys in (("qvg", "centroids"), ("rtn", "codes")):
        monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--rescore", str(sweep), "--policies", policy, "--up-to",
                                          "16", "--keys", keys, "--write", str(table), "--out", str(out)])
        tune_tiles.main()
        assert json.loads(out.read_text())["environment"]["gpu"] == "Some GPU"
    rows = json.loads(table.read_text())["Some GPU"]["decode"]
    # a sweep from before an option existed: its tiles had the option's default
    assert rows == [{"up_to": 16, "keys": "centroids", **fast_smoothed, "key_scores": None},
                    {"up_to": 16, "keys": "codes", **fast_plain, "key_scores": None}, many]
    monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--rescore", str(sweep), "--policies", "kivi", "--out", str(out)])
    with pytest.raises(SystemExit, match="no case"):
        tune_tiles.main()


def test_rescore_picks_a_row_by_clusters_from_the_cases_of_some_shapes(monkeypatch, tmp_path):
    """``--shapes`` keeps the cases whose first field it names: a summing-assignment sweep gives a
    row for at most 16 clusters from its 16-cluster shapes and a row for more from the rest."""
    small, large = {"tokens": 128, "warps": 4, "waves": 8}, {"tokens": 64, "warps": 4, "waves": 4}
    earlier = {"environment": {"gpu": "Some GPU"}, "kernel": "assign_sums", "tiles": [small, large],
               "cases": [{"case": ["pass_16"], "ms": [0.2, 0.3]}, {"case": ["chunk_16"], "ms": [0.02, 0.03]},
                         {"case": ["pass_32"], "ms": [0.4, 0.3]}]}
    sweep, table, out = tmp_path / "sweep.json", tmp_path / "tiles.json", tmp_path / "out.json"
    sweep.write_text(json.dumps(earlier))
    for shapes, up_to in ((["pass_16", "chunk_16"], ["--up-to", "16"]), (["pass_32"], [])):
        monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--kernel", "assign_sums", "--rescore", str(sweep),
                                          "--shapes", *shapes, *up_to, "--write", str(table), "--out", str(out)])
        tune_tiles.main()
    assert json.loads(table.read_text())["Some GPU"]["assign_sums"] == [{"up_to": 16, **small},
                                                                          {"up_to": None, **large}]
    monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--kernel", "assign_sums", "--rescore", str(sweep),
                                      "--shapes", "pass_64", "--out", str(out)])
    with pytest.raises(SystemExit, match="no case"):
        tune_tiles.main()


def test_assignment_rows_by_clusters_on_chip_and_tiled(monkeypatch, tmp_path):
    """An assignment sweep gives two rows: its winner for up to 256 clusters (a tile that keeps
    the centroids on chip) and, with ``--tiled``, the best tile that loops over centroid tiles
    for any count; ``--tiled`` is refused for another kernel."""
    on_chip = {"tokens": 64, "clusters": 256, "warps": 4, "stages": 3, "waves": 2}
    tiled, slow = ({"tokens": t, "clusters": 32, "warps": 4, "stages": 3, "waves": 0} for t in (128, 64))
    earlier = {"environment": {"gpu": "Some GPU"}, "kernel": "assign", "tiles": [slow, on_chip, tiled],
               "cases": [{"case": ["longcat_video"], "ms": [0.3, 0.16, 0.2]}, {"case": ["self_forcing"],
                                                                                "ms": [0.12, 0.08, 0.1]}]}
    sweep, table, out = tmp_path / "sweep.json", tmp_path / "tiles.json", tmp_path / "out.json"
    sweep.write_text(json.dumps(earlier))
    for flags in (["--up-to", "256"], ["--tiled"]):
        monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--kernel", "assign", "--rescore", str(sweep), *flags,
                                          "--write", str(table), "--out", str(out)])
        tune_tiles.main()
    assert json.loads(table.read_text())["Some GPU"]["assign"] == [{"up_to": 256, **on_chip}, {"up_to": None, **tiled}]
    monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--kernel", "update", "--tiled", "--rescore", str(sweep),
                                      "--out", str(out)])
    with pytest.raises(SystemExit, match="--tiled is for the assignment"):
        tune_tiles.main()


def test_rescore_picks_rows_by_the_keys_a_call_reads(monkeypatch, tmp_path):
    """``--reads-up-to N`` picks over the cases that read at most N span keys (batch x history)
    and bounds the row it writes by N; ``--reads-above N`` picks over the others for the row
    without that bound; a bound no case meets stops with a message."""
    small = {"block_n": 64, "piece": 512, "max_rows": 64, "warps": 2, "stages": [1], "waves": 16, "maxnreg": None,
             "key_scores": None}
    large = {**small, "block_n": 128, "warps": 4, "maxnreg": 128, "key_scores": 0}
    earlier = {"environment": {"gpu": "Some GPU"}, "kernel": "decode", "tiles": [small, large],
               "cases": [{"case": [1, 32768, 1, "qvg"], "ms": [0.05, 0.06]},
                         {"case": [1, 131072, 1, "qvg"], "ms": [0.21, 0.19]},
                         {"case": [8, 32768, 1, "qvg"], "ms": [0.40, 0.35]}]}
    sweep, table, out = tmp_path / "sweep.json", tmp_path / "tiles.json", tmp_path / "out.json"
    sweep.write_text(json.dumps(earlier))
    for reads in (["--reads-up-to", "65536"], ["--reads-above", "65536"]):
        monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--rescore", str(sweep), "--up-to", "16", "--keys",
                                          "centroids", *reads, "--write", str(table), "--out", str(out)])
        tune_tiles.main()
    assert json.loads(table.read_text())["Some GPU"]["decode"] == [
        {"up_to": 16, "keys": "centroids", "reads_up_to": 65536, **small}, {"up_to": 16, "keys": "centroids", **large}]
    monkeypatch.setattr(sys, "argv", ["tune_tiles.py", "--rescore", str(sweep), "--reads-up-to", "1000",
                                      "--out", str(out)])
    with pytest.raises(SystemExit, match="no case reads"):
        tune_tiles.main()
