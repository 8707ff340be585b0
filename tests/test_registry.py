import subprocess
import sys

import pytest

from qkv.errors import SpecError, UnknownComponentError
from qkv.registry import Registry, format_token, parse_token


def test_registry_register_get_list_build():
    reg: Registry = Registry("widget")

    @reg.register("square")
    def square(side: int = 1):
        return ("square", side)

    assert reg.list() == ["square"] and "square" in reg
    assert reg.build("square(side=3)") == ("square", 3)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("square")(square)
    with pytest.raises(UnknownComponentError, match="unknown widget 'circle'; valid widget names: square"):
        reg.get("circle")
    with pytest.raises(SpecError, match="bad arguments"):
        reg.build("square(radius=2)")


@pytest.mark.parametrize("token", ["a", "a(x=1)", "a(x=1.5,y=true,z=fp8)", "int2(block=16,mode=asym)"])
def test_token_round_trip(token):
    name, kwargs = parse_token(token)
    assert format_token(name, kwargs) == token


def test_import_is_light():
    """import qkv must not import triton, faiss or hypothesis (only qkv.testing needs it), nor
    initialize CUDA; computing an error bound imports nothing more."""
    code = (
        "import sys, qkv, torch; p = qkv.build_policy('qvg', clusters=4);"
        "x = torch.randn(1, 1, 64, 64); p.error_bound(p.compress(x, x));"
        "assert 'triton' not in sys.modules, 'triton'; assert 'faiss' not in sys.modules, 'faiss';"
        "assert 'hypothesis' not in sys.modules, 'hypothesis';"
        "assert not torch.cuda.is_initialized()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_long_run_of_blanks_parses_in_linear_time():
    import time

    import qkv

    start = time.perf_counter()
    with pytest.raises(SpecError) as err:  # did not return in 60 s: the token regex was quadratic
        qkv.build_policy("int2" + " " * 10**6 + "x")
    assert time.perf_counter() - start < 2
    assert len(str(err.value)) < 300 and "1,000,007 characters" in str(err.value)  # not a 1 MB message
    assert parse_token("  int2 (block=16)  ") == ("int2", {"block": 16})
