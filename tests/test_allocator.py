"""gnaq_dist.allocator on this machine's glibc: freed large blocks stay for reuse."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import numpy as np
from gnaq_dist.allocator import retain_freed_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

applied = retain_freed_memory() if sys.argv[1] == "retain" else False
before = rss_mib()
block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page touched
del block
print(applied, rss_mib() - before)
"""


def _run(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    applied, grown = out.split()
    return applied == "True", float(grown)


def test_freed_large_blocks_stay_in_the_process_only_when_retained():
    applied, kept = _run("retain")
    assert applied  # glibc (the CI and dev machines): mallopt accepted both settings
    assert kept > 150  # the freed 200 MiB block is still resident, ready for the next tensor
    not_applied, default = _run("default")
    assert not not_applied and default < 50  # glibc's default: munmap on free


def test_it_is_idempotent():
    from gnaq_dist.allocator import retain_freed_memory

    assert retain_freed_memory() == retain_freed_memory()


RELEASE = """
import numpy as np, pyarrow as pa
from gnaq_dist.allocator import release_free_memory

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

chunks = [pa.array(np.arange(2**17, dtype=np.int64) + i) for i in range(256)]  # 256 MiB in 1 MiB buffers
table = pa.concat_arrays(chunks)
del chunks, table
before = rss_mib()
release_free_memory()
print(before - rss_mib())
"""


def test_release_free_memory_returns_what_pyarrow_freed():
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout
    assert float(out) > 100  # most of the 2 x 256 MiB the pool kept after the arrays died


def test_huge_page_table_is_an_aligned_usable_table_or_a_plain_one():
    """Large CPU tables start on a 2 MiB boundary (so THP can back them) and behave as any
    tensor; small ones are plain ``torch.empty``."""
    import torch

    from gnaq_dist.allocator import huge_page_table

    big = huge_page_table((100_000, 64), torch.float32)  # 25.6 MB
    assert big.shape == (100_000, 64) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.data_ptr() % (2 << 20) == 0
    big.copy_(torch.arange(100_000 * 64, dtype=torch.float32).reshape(100_000, 64))
    assert float(big[99_999, 63]) == 100_000 * 64 - 1
    assert torch.equal((big * 2)[:3], torch.arange(192, dtype=torch.float32).reshape(3, 64) * 2)
    small = huge_page_table((10, 4), "float16")
    assert small.shape == (10, 4) and small.dtype == torch.float16
