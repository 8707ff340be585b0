"""The frontier plot: legend outside the panels, a marker key, 2-5 bits, off-scale points on the edge."""

import dataclasses

import matplotlib.pyplot as plt
import pytest

from qkv.evaluation import Result
from qkv.evaluation.plot import BITS_SHOWN, frontier_figure
from qkv.evaluation.report import format_duration

BASE = Result("wan", "rtn", "rtn", "int2", "preset", 2.5, 2.5, 2.5, 6.4, 0.17, 0.17, 7.6, 7.6, 1.0, 1.0, "cpu", 10)
ROWS = [
    BASE,
    dataclasses.replace(BASE, policy="rtn(bits=3)", group="sweep", bits=3.5, snr_k_db=14.0, snr_v_db=14.0),
    dataclasses.replace(BASE, policy="qvg-pro", family="qvg-pro", bits=10.7, snr_k_db=21.0, snr_v_db=18.0),
    dataclasses.replace(BASE, policy="bf16", family="bf16", bits=16.0, snr_k_db=float("inf")),
]
LABELS = {"wan": "Wan2.1-1.3B-shaped DiT (random weights); 1 of 2 layers, 2 of 12 heads, 37,440 tokens, D = 128"}


@pytest.fixture
def fig():
    figure = frontier_figure(ROWS, LABELS, "quick run")
    figure.canvas.draw()
    yield figure
    plt.close(figure)


def test_axes_show_the_competitive_range_and_mark_off_scale_points_at_the_edge(fig):
    for ax in fig.axes:
        assert ax.get_xlim() == BITS_SHOWN
        edge = [line for line in ax.lines if line.get_marker() == ">"]
        assert [tuple(line.get_xdata()) for line in edge] == [(BITS_SHOWN[1],)]  # qvg-pro, not bf16
        assert [text.get_text() for text in ax.texts] == ["10.7"]


def test_legend_is_outside_the_panels_and_keys_the_markers(fig):
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:2] == ["qvg-pro", "rtn"] and "preset" in texts and "bit-width sweep" in texts
    box = legend.get_window_extent()
    assert all(box.x0 >= ax.get_window_extent().x1 for ax in fig.axes)


def test_panel_titles_carry_the_dataset_label_readably(fig):
    title = fig.axes[0].title
    assert "random weights" in title.get_text() and "37,440 tokens" in title.get_text()
    assert title.get_fontsize() >= 9


@pytest.mark.parametrize("seconds, text", [(0.0004, "0.4 ms"), (0.43, "430 ms"), (4.31, "4.3 s"),
                                            (430.3645, "7 min 10 s"), (4290, "1 h 11 min")])
def test_durations_read_in_human_units(seconds, text):
    assert format_duration(seconds) == text
