"""gnaq_dist.allocator on this machine's glibc: freed large blocks stay for reuse."""

from __future__ import annotations

import os
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


THREAD = """
import resource, threading
import numpy as np

def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

rounds = []

def loop():  # as a step does: blocks of several sizes under 32 MiB, some outliving others
    for _ in range(4):
        before = faults()
        kept = []
        for i, mib in enumerate([3, 20, 9, 30, 5, 12, 25, 7]):
            block = np.ones(mib * 2**20 // 8)  # every page touched
            if i % 2:
                kept.append(block)
            del block
        del kept
        rounds.append(faults() - before)

thread = threading.Thread(target=loop)  # Ray Train runs the training loop in a thread
thread.start()
thread.join()
print(*rounds)
"""


def _thread_rounds(extra_env: dict[str, str]) -> list[int]:
    from gnaq_dist.allocator import THREAD_ALLOCATION_ENV

    env = {k: v for k, v in os.environ.items() if k not in THREAD_ALLOCATION_ENV}
    out = subprocess.run([sys.executable, "-c", THREAD], capture_output=True, text=True, check=True,
                         env={**env, **extra_env}).stdout
    return [int(n) for n in out.split()]


def test_a_thread_reuses_the_blocks_it_freed_with_the_workers_allocator_settings():
    """What ``train_on_ray`` gives its workers' environment: a thread's freed blocks stay in
    the process, so the next round of the same blocks takes no fresh pages."""
    from gnaq_dist.allocator import THREAD_ALLOCATION_ENV, worker_allocator_env

    first, *again = _thread_rounds(THREAD_ALLOCATION_ENV)
    assert first > 1000 and max(again) <= first // 100, (first, again)
    # glibc's defaults: the thread's arena unmaps its emptied heaps, every round faults anew.
    first, *again = _thread_rounds({})
    assert min(again) >= first // 5, (first, again)
    assert worker_allocator_env().keys() == THREAD_ALLOCATION_ENV.keys()
