"""run_eval: rows saved as they finish, resumed by the next run, heads evaluated independently."""

import dataclasses
import json

import pytest
import torch

import qkv
from qkv.evaluation import EvalConfig, Selection, evaluate, run_eval
from qkv.evaluation import run as run_module

POLICIES = ("qvg", "rtn", "bf16")


@pytest.fixture
def config(tmp_path, fake_realdata):
    return EvalConfig(
        datasets=("a", "b"), selection=Selection(layers=1, heads=2), device=torch.device("cpu"), out=tmp_path,
        policies=POLICIES, matched=False, sweep=False, ablation=False, progress=False,
    )


def saved(config):
    return json.loads((config.out / "eval.json").read_text())


def test_rows_are_saved_and_a_second_run_reuses_them(config):
    first = run_eval(config, log=lambda line: None)
    payload = saved(config)
    assert payload["run"]["complete"] and first.reused == 0
    assert [(r["dataset"], r["policy"]) for r in payload["results"]] == [(d, p) for d in "ab" for p in POLICIES]
    assert payload["datasets"]["a"] == "fake a; 1 of 2 layers, 2 of 3 heads, 96 tokens, D = 64"
    assert (config.out / "frontier.png").stat().st_size > 10_000
    assert "| rtn | preset |" in (config.out / "eval.md").read_text()
    lines = []
    second = run_eval(config, log=lines.append)
    assert second.reused == 6 and second.results == first.results
    assert "resuming: 6 rows" in lines[0]
    sessions = saved(config)["run"]["sessions"]
    assert [(s["computed_rows"], s["reused_rows"]) for s in sessions] == [(6, 0), (0, 6)]
    assert set(sessions[0]["phases_s"]) == {"load", "evaluate", "plot"} and sessions[0]["process"]["user_s"] > 0
    assert run_eval(dataclasses.replace(config, restart=True), log=lambda line: None).reused == 0


def test_a_crash_keeps_the_finished_rows_and_the_next_run_resumes(config, monkeypatch):
    calls = []

    def crash_on_third(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("boom")
        calls.append(args[1])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate", crash_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        run_eval(config, log=lambda line: None)
    payload = saved(config)
    assert not payload["run"]["complete"]
    assert [r["policy"] for r in payload["results"]] == ["qvg", "rtn"]
    assert "| rtn | preset |" in (config.out / "eval.md").read_text()
    monkeypatch.setattr(run_module, "evaluate", evaluate)
    assert run_eval(config, log=lambda line: None).reused == 2
    assert saved(config)["run"]["complete"]


def test_rows_made_with_another_selection_are_not_reused(config):
    run_eval(config, log=lambda line: None)
    lines = []
    other = run_eval(dataclasses.replace(config, selection=Selection(layers=1, heads=1)), log=lines.append)
    assert other.reused == 0
    assert "6 rows made with selection={'layers': 1, 'heads': 2}" in lines[0]


def test_heads_are_evaluated_independently(fake_realdata):
    # the rows of a subset of heads are exactly those heads' part of the full run: the full run's
    # error sums are the sums over single-head runs (a joint k-means init would break this)
    samples = fake_realdata("x")[:1]
    policy = qkv.build_policy("qvg", clusters=8)
    full = evaluate(policy, "qvg", "x", samples, device=torch.device("cpu"))
    heads = [evaluate(policy, "qvg", "x", Selection(heads=1).apply([dataclasses.replace(
        samples[0], k=samples[0].k[:, h:], v=samples[0].v[:, h:])]), device=torch.device("cpu")) for h in range(3)]
    k = samples[0].k.bfloat16()
    signal = [float(k[:, h].double().square().sum()) for h in range(3)]
    error = sum(r.rel_mse_k * s for r, s in zip(heads, signal))
    assert full.rel_mse_k == pytest.approx(error / sum(signal), rel=1e-12)
    assert all(r.bits == full.bits for r in heads)


def test_a_head_subset_keeps_every_presets_bits_per_element(fake_realdata):
    samples = fake_realdata("y")
    for name in qkv.list_policies():
        policy = qkv.build_policy(name)
        quick = evaluate(policy, name, "y", Selection(layers=1, heads=1).apply(samples), device=torch.device("cpu"))
        full = evaluate(policy, name, "y", samples, device=torch.device("cpu"))
        assert quick.bits == full.bits, name


def test_every_dataset_is_loaded_before_any_policy_runs(config, monkeypatch, fake_realdata):
    def load(name, progress=True):
        if name == "b":
            raise OSError("espeak-ng not found")
        return fake_realdata(name)

    def evaluate_nothing(*args, **kwargs):
        raise AssertionError("a policy ran before every dataset was loaded")

    monkeypatch.setattr(run_module, "load_dataset", load)
    monkeypatch.setattr(run_module, "evaluate", evaluate_nothing)
    with pytest.raises(OSError, match="espeak-ng"):
        run_eval(config, log=lambda line: None)


def test_markdown_rows_keep_pipes_in_a_policy_name():
    """A policy named with pipes (the ablation's qvg+kmeans||) stays one cell of its Markdown row."""
    from qkv.evaluation.report import COLUMNS, format_markdown
    from qkv.evaluation.runner import Result

    row = Result("wan", "qvg+kmeans||", "qvg", "kmeans(init=kmeans||),centroid,int2", "ablation", 2.3, 2.3, 2.3, 6.9,
                 0.03, 0.02, 15.0, 16.0, 12.0, 3.0, "cpu", 100)
    line = next(s for s in format_markdown([row], {"wan": "Wan"}).splitlines() if "kmeans" in s)
    assert line.startswith("| qvg+kmeans\\|\\| | ablation |")
    assert line.replace("\\|", "").count("|") == len(COLUMNS) + 1
