"""Per-device tiles (decode, fused attention, quantize, dequantize and k-means assignment kernels): the table's entry for a GPU's name wins
over the default, the interpreter gets its own tile, and a tile passed explicitly is the one the
decode kernel runs."""

import json

import pytest
import torch

pytest.importorskip("triton")

import qkv  # noqa: E402
from qkv.kernels import CompressedSpan, SpanPlan  # noqa: E402
from qkv.kernels.segments import KEY_CLASSES  # noqa: E402
from qkv.kernels.triton import tiles  # noqa: E402
from qkv.kernels.triton.decode import decode_triton  # noqa: E402

from test_attention import assert_within_twice_the_torch_error, history, randn  # noqa: E402


def test_interpreter_tile_off_the_gpu():
    for kernel in ("decode", "attention", "dequantize", "quantize", "assign", "assign_sums"):
        assert tiles.tile_for(kernel, torch.device("cpu"), 4) == tiles.INTERPRETER[kernel]


def test_table_entry_for_the_device_name(monkeypatch, tmp_path):
    table = tmp_path / "tiles.json"
    few = {"up_to": 16, "block_n": 128, "piece": 512, "max_rows": 64, "warps": 8, "stages": [3, 2, 1], "waves": 8}
    many = {"up_to": None, "block_n": 32, "piece": 256, "max_rows": 64, "warps": 4, "stages": [1], "waves": 2}
    prefill = {"up_to": None, "order": [[128, 64, 8, 2, 2]]}
    dequantize = {"up_to": None, "fast_values": 8192, "values": 16384, "warps": 8}
    assign = [{"up_to": 128, "tokens": 32, "clusters": 128, "warps": 4, "stages": 2, "waves": 1},
              {"up_to": None, "tokens": 64, "clusters": 64, "warps": 8}]
    table.write_text(json.dumps({"Some GPU": {"decode": [few, many], "attention": [prefill], "dequantize": [dequantize],
                                              "assign": assign}}))
    monkeypatch.setattr(tiles, "TABLE", table)
    monkeypatch.setattr(tiles, "_table", tiles._table.__wrapped__)
    monkeypatch.setattr(tiles, "_gpu_tiles", tiles._gpu_tiles.__wrapped__)
    monkeypatch.setattr(tiles, "_device_name", lambda index: "Some GPU")
    cuda = torch.device("cuda", 0)
    assert tiles.tile_for("decode", cuda, 4) == tiles.DecodeTile(128, 512, 64, 8, (3, 2, 1), 8)
    assert tiles.tile_for("decode", cuda, 16) == tiles.tile_for("decode", cuda, 4)
    assert tiles.tile_for("decode", cuda, 17) == tiles.DecodeTile(32, 256, 64, 4, (1,), 2)
    assert tiles.tile_for("attention", cuda, 4680).order == ((128, 64, 8, 2, 2),)
    assert tiles.tile_for("dequantize", cuda, 0) == tiles.DequantizeTile(8192, 16384, 8)
    assert tiles.tile_for("assign", cuda, 128) == tiles.AssignTile(32, 128, 4, 2, 1)  # rows by the clusters
    assert tiles.tile_for("assign", cuda, 129) == tiles.AssignTile(64, 64, 8)
    monkeypatch.setattr(tiles, "_device_name", lambda index: "Another GPU")
    assert tiles.tile_for("decode", cuda, 4) == tiles.DEFAULTS["decode"]
    # a GPU the table does not name: the assignment's default rows, centroids on chip up to 256
    assert tiles.tile_for("assign", cuda, 256) == tiles.AssignTile(64, 256, 4, 3, 2)
    assert tiles.tile_for("assign", cuda, 512) == tiles.DEFAULTS["assign"] == tiles.AssignTile(128, 32, 4)


def test_the_shipped_table_names_known_fields():
    if not tiles.TABLE.exists():
        pytest.skip("no per-device table shipped")
    for gpu, kernels in json.loads(tiles.TABLE.read_text()).items():
        for kernel, entries in kernels.items():
            assert entries[-1]["up_to"] is None, gpu  # a tile for any call
            for entry in entries:
                assert type(tiles.DEFAULTS[kernel])(**{k: v for k, v in entry.items()
                                                       if k not in tiles.TABLE_BOUNDS}), gpu
                assert entry.get("keys") in (None, *KEY_CLASSES) and (kernel == "decode" or "keys" not in entry)


def test_decode_tiles_per_class_of_keys(monkeypatch, tmp_path):
    """A decode tile that names a class of ``keys`` is for that class only; one that does not is
    for every class; spans stored as floats take the tiles of codes where no tile names them."""
    table = tmp_path / "tiles.json"
    smoothed = {"up_to": 16, "keys": "centroids", "block_n": 128, "piece": 512, "max_rows": 64, "warps": 2,
                "stages": [1], "waves": 16}
    plain = {**smoothed, "keys": "codes", "warps": 4, "maxnreg": 128}
    cast = {**smoothed, "keys": "cast", "warps": 8, "piece": 1024, "stages": [2, 1]}
    many = {"up_to": None, "block_n": 64, "piece": 256, "max_rows": 64, "warps": 4, "stages": [1], "waves": 8}
    monkeypatch.setattr(tiles, "TABLE", table)
    monkeypatch.setattr(tiles, "_table", tiles._table.__wrapped__)
    monkeypatch.setattr(tiles, "_gpu_tiles", tiles._gpu_tiles.__wrapped__)
    monkeypatch.setattr(tiles, "_device_name", lambda index: "Some GPU")
    cuda = torch.device("cuda", 0)
    table.write_text(json.dumps({"Some GPU": {"decode": [smoothed, plain, many]}}))
    assert tiles.tile_for("decode", cuda, 4, "centroids") == tiles.DecodeTile(128, 512, 64, 2, (1,), 16)
    assert tiles.tile_for("decode", cuda, 4, "codes") == tiles.DecodeTile(128, 512, 64, 4, (1,), 16, maxnreg=128)
    assert tiles.tile_for("decode", cuda, 4, "cast") == tiles.tile_for("decode", cuda, 4, "codes")
    for keys in KEY_CLASSES:
        assert tiles.tile_for("decode", cuda, 64, keys) == tiles.DecodeTile(64, 256, 64, 4, (1,), 8)
    table.write_text(json.dumps({"Some GPU": {"decode": [smoothed, plain, cast, many]}}))
    assert tiles.tile_for("decode", cuda, 4, "cast") == tiles.DecodeTile(128, 1024, 64, 8, (2, 1), 16)
    assert tiles.tile_for("decode", cuda, 4, "codes") == tiles.DecodeTile(128, 512, 64, 4, (1,), 16, maxnreg=128)
    with pytest.raises(ValueError, match="keys must be one of"):
        tiles.tile_for("decode", cuda, 4, "plain")


@pytest.mark.parametrize("names, expected", [
    (["qvg"], "centroids"), (["rtn"], "codes"), (["kivi"], "codes"), (["quarot"], "codes"), (["bf16"], "cast"),
    (["bf16", "rtn"], "codes"), (["bf16", "qvg"], "centroids"), (["rtn", "qvg", "bf16"], "centroids"),
])
def test_a_plan_knows_the_class_of_its_keys(names, expected):
    """The class the decode kernel's tile is chosen by, of a plan made at once and of one extended
    span by span (the class of the spans already planned carried over)."""
    spans = []
    for i, name in enumerate(names):
        pol = qkv.build_policy(name, clusters=4) if name == "qvg" else qkv.build_policy(name)
        spans.append(CompressedSpan(pol.compress(randn(90 + i, 1, 2, 40, 64), randn(95 + i, 1, 2, 40, 64)), 0))
    assert SpanPlan(spans).keys == expected
    plan = None
    for i in range(len(spans)):
        plan = SpanPlan(spans[: i + 1], plan)
    assert plan.keys == expected


@pytest.mark.parametrize("tile", [
    tiles.DecodeTile(block_n=32, piece=32, max_rows=16, warps=2, stages=(1,), waves=1),  # a GPU's smallest keys
    tiles.DecodeTile(block_n=32, piece=64, max_rows=16, warps=4, stages=(1,), waves=8),
])
def test_explicit_tile_is_run(tile):
    segments = history("qvg", seed=5)
    q = randn(6, 1, 4, 3, 64)
    assert_within_twice_the_torch_error(decode_triton(q, segments, tile=tile), q, segments)


def added_stages(ct) -> tuple[list, list]:
    """The centroids and assignments, rows flattened, of the stages of ``ct`` that add centroids back."""
    added = [i for i, stage in enumerate(ct.stages) if stage.centroids is not None]
    return [ct.stages[i].centroids.flatten(0, 1) for i in added], [ct.stage_assignments(i) for i in added]


@pytest.mark.parametrize("tile", [tiles.DequantizeTile(1024, 2048, 2), tiles.DequantizeTile(16384, 4096, 8)])
@pytest.mark.parametrize("name", ["qvg", "qvg-pro", "kivi"])
def test_explicit_dequantize_tile_decodes_the_same(tile, name):
    """Any dequantize tile writes the same values as the device's (the tile only cuts the work)."""
    import qkv
    from qkv.kernels import quantize as kq
    from qkv.kernels.triton.quantize import dequantize_triton

    policy = qkv.build_policy(name, clusters=8) if name.startswith("qvg") else qkv.build_policy(name)
    ct = policy.compress(randn(7, 1, 2, 320, 64), randn(8, 1, 2, 320, 64)).k  # past kivi's 128-token window
    rows = kq.QuantizedRows(*(None if t is None else t.flatten(0, 1) for t in (ct.codes, ct.scales, ct.zeros,
                                                                              ct.scale_mult)))
    centroids, assignments = added_stages(ct)  # none for kivi
    q = ct.quantized_tokens
    ours = dequantize_triton(rows, ct.format.codes, q, centroids, assignments, tile=tile)
    default = dequantize_triton(rows, ct.format.codes, q, centroids, assignments)
    assert torch.equal(ours, default)


@pytest.mark.parametrize("settle", [0, 3, 12])
def test_quantize_tile_settles_a_power_of_two_of_tiles(settle):
    """The settling pass reads its tiles' raw scales in one load, so their count is a power of two."""
    with pytest.raises(ValueError, match="settle_tiles must be a power of two"):
        tiles.QuantizeTile(4096, 4, settle)


@pytest.mark.parametrize("tile", [tiles.QuantizeTile(256, 2, 1), tiles.QuantizeTile(16384, 8, 64)])
@pytest.mark.parametrize("name", ["qvg", "kivi"])
def test_explicit_quantize_tile_packs_the_same(tile, name):
    """Any quantize tile (rows and warps a program, tiles a program of the settling pass) writes
    the same codes, scales, zero points and row multipliers as the device's."""
    import qkv
    from qkv.kernels.triton.quantize import quantize_pack_triton

    policy = qkv.build_policy(name, clusters=8) if name == "qvg" else qkv.build_policy(name)
    x = randn(11, 1, 2, 320, 64)
    ct = policy.compress(x, x).k
    fmt = ct.format.codes
    rows = x.flatten(0, 1) if fmt.axis == "token" else x.flatten(0, 1).transpose(1, 2)
    centroids, assignments = added_stages(ct)  # none for kivi
    ours = quantize_pack_triton(rows, fmt, centroids, assignments, tile=tile)
    default = quantize_pack_triton(rows, fmt, centroids, assignments)
    for field in ("codes", "scales", "zeros", "mult"):
        a, b = getattr(ours, field), getattr(default, field)
        assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("tile", [tiles.AssignTile(64, 16, 4), tiles.AssignTile(128, 128, 8)])
def test_explicit_assign_tile_finds_the_same_centroids(tile):
    """Any assignment tile picks the same nearest centroids (ties to the lower index) at the same
    distances as the device's."""
    from qkv.kernels.triton.kmeans.assign import assign_triton

    x, cents = randn(9, 3, 300, 64).bfloat16(), randn(10, 3, 70, 64)
    idx, dist = assign_triton(x, cents, tile=tile)
    ref_idx, ref_dist = assign_triton(x, cents)
    assert torch.equal(idx, ref_idx) and torch.allclose(dist, ref_dist, rtol=1e-6, atol=0)



@pytest.mark.parametrize("tile", [tiles.AssignSumsTile(32, 4, 8), tiles.AssignSumsTile(128, 8, 2)])
def test_explicit_assign_sums_tile_sums_the_same_clusters(tile):
    """Any tile of the assignment that sums finds the same nearest centroids and counts as the
    device's, at the same distances and with the same sums up to their fp32 order (the tile sets
    the products' shape, the parts and the steps)."""
    from qkv.kernels.triton.kmeans.assign import assign_triton

    x, cents = randn(11, 3, 300, 64).bfloat16(), randn(12, 3, 20, 64)
    idx, dist, sums = assign_triton(x, cents, sums=True, sum_tile=tile)
    ref_idx, ref_dist, ref_sums = assign_triton(x, cents, sums=True)
    assert torch.equal(idx, ref_idx) and torch.allclose(dist, ref_dist, rtol=1e-6, atol=0)
    assert torch.equal(sums.counts.sum(1), ref_sums.counts.sum(1))
    assert torch.allclose(sums.sums.sum(1), ref_sums.sums.sum(1), rtol=1e-5, atol=1e-4)


def test_decode_tiles_by_the_keys_a_call_reads(monkeypatch, tmp_path):
    """A decode tile with ``reads_up_to`` is for calls that read at most that many span keys over
    their batch; more take the next tile that holds the rows (bounded by reads or not)."""
    table = tmp_path / "tiles.json"
    short = {"up_to": 16, "keys": "centroids", "reads_up_to": 65536, "block_n": 64, "piece": 512, "max_rows": 64,
             "warps": 2, "stages": [1], "waves": 16}
    longer = {**short, "reads_up_to": None, "block_n": 128, "warps": 4, "maxnreg": 128, "key_scores": 0}
    many = {"up_to": None, "block_n": 64, "piece": 256, "max_rows": 64, "warps": 4, "stages": [1], "waves": 8}
    table.write_text(json.dumps({"Some GPU": {"decode": [short, {k: v for k, v in longer.items() if v is not None},
                                                         many]}}))
    monkeypatch.setattr(tiles, "TABLE", table)
    monkeypatch.setattr(tiles, "_table", tiles._table.__wrapped__)
    monkeypatch.setattr(tiles, "_gpu_tiles", tiles._gpu_tiles.__wrapped__)
    monkeypatch.setattr(tiles, "_device_name", lambda index: "Some GPU")
    cuda = torch.device("cuda", 0)
    assert tiles.tile_for("decode", cuda, 4, "centroids", 32768) == tiles.DecodeTile(64, 512, 64, 2, (1,), 16)
    assert tiles.tile_for("decode", cuda, 4, "centroids", 65536) == tiles.DecodeTile(64, 512, 64, 2, (1,), 16)
    assert tiles.tile_for("decode", cuda, 4, "centroids", 65537) == tiles.DecodeTile(
        128, 512, 64, 4, (1,), 16, maxnreg=128, key_scores=0)
    assert tiles.tile_for("decode", cuda, 4, "codes", 32768) == tiles.DecodeTile(64, 256, 64, 4, (1,), 8)
    assert tiles.tile_for("decode", cuda, 64, "centroids", 32768) == tiles.DecodeTile(64, 256, 64, 4, (1,), 8)
    table.write_text(json.dumps({"Some GPU": {"decode": [short, many]}}))  # no tile for more reads at 4 rows
    assert tiles.tile_for("decode", cuda, 4, "centroids", 10**6) == tiles.DecodeTile(64, 256, 64, 4, (1,), 8)
