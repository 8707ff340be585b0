"""keep_freed_memory: a large block freed and allocated again is not faulted in again."""

import platform
import subprocess
import sys

import pytest

COUNT_FAULTS = """
import resource, sys, torch
from qkv.evaluation.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # 64 MB, freed again: the heap settles after two
    torch.ones(1 << 24).sum()
before = faults()
for _ in range(5):
    torch.ones(1 << 24).sum()
print(faults() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", COUNT_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert faults("default") > 5 * 8000  # 5 x 64 MB of 4 KB pages, mapped and zeroed each time
    assert faults("keep") < 2000
