"""The Python examples in README.md and docs/ run as written."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize(
    "page",
    [
        "../README.md",
        "policies.md",
        "extending.md",
        "testing.md",
        "cache.md",
        "attention.md",
        "adapters/self_forcing.md",
        "adapters/streamdiffusionv2.md",
        "adapters/anyflow_far.md",
        "adapters/sana_wm.md",
        "adapters/flashdreams.md",
        "adapters/longcat_video.md",
        "adapters/hy_worldplay.md",
        pytest.param("adapters/wan.md", marks=pytest.mark.realdata),  # real video frames
        pytest.param("adapters/transformers.md", marks=pytest.mark.realdata),  # Whisper, real speech
    ],
)
def test_doc_examples_run(page, tmp_path):
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    # a fresh interpreter per page: examples register components, which must not leak into the
    # registries the other tests draw from
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(DOCS.parent), os.environ.get("PYTHONPATH", "")]),
        # transformers >= 5.24 takes `cache=`: an example with the old argument fails
        "PYTHONWARNINGS": "error:`past_key_values` is deprecated:FutureWarning",
    }
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, env=env, timeout=300)
