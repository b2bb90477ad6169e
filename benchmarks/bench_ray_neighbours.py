"""What idle Ray processes beside the training workers cost their step, side by side.

Runs ``profile_step.py`` (W gloo ranks in plain processes) with no Ray on the machine,
then beside a local Ray holding N idle actors (``num_cpus=0``, each a Ray Python process
whose core worker wakes 100 times a second), for each N of ``--actors``, ``--repeats``
times in alternation, and prints seconds per step and the ratio to no Ray. This is why
the Ray that ``train_on_ray`` starts for one job leaves out the processes it does not use
(docs/notes/scale-history.md, "a Ray for one job, without the processes it does not use").

    python benchmarks/bench_ray_neighbours.py --actors 0,8,16 -- \\
        --dataset /tmp/gs/1-10/ds --world 2 --warm 2 --steps 20
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from gnaq_dist.distributed.ray_launch import ray_environment

HERE = Path(__file__).resolve().parent

IDLE_RAY = """
import os, sys, ray
ray.init(num_cpus=(os.cpu_count() or 1) + 1, include_dashboard=False, object_store_memory=256 << 20)
@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return os.getpid()
actors = [Idle.remote() for _ in range(int(sys.argv[1]))]
ray.get([a.ping.remote() for a in actors])
print("ready", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
ray.shutdown()
"""


def step_seconds(profile_args: list[str]) -> float:
    out = subprocess.run([sys.executable, str(HERE / "profile_step.py"), *profile_args],
                         capture_output=True, text=True, check=True).stdout
    return max(float(s) for s in re.findall(r"rank \d+ of \d+: ([0-9.]+) s/step", out))


def beside_idle_ray(actors: int | None, profile_args: list[str]) -> float:
    if actors is None:
        return step_seconds(profile_args)
    ray = subprocess.Popen([sys.executable, "-c", IDLE_RAY, str(actors)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        if ray.stdout.readline().strip() != "ready":
            raise RuntimeError("the idle Ray did not start")
        return step_seconds(profile_args)
    finally:
        ray.stdin.close()
        ray.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", default="0,8,16", help="idle actors beside the step, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("profile_args", nargs=argparse.REMAINDER, help="-- then profile_step.py's arguments")
    args = parser.parse_args()
    ray_environment()  # the idle Ray gets the settings a gnaq run's Ray has
    profile_args = [a for a in args.profile_args if a != "--"]
    cases: list[int | None] = [None, *(int(n) for n in args.actors.split(","))]
    seconds: dict[int | None, list[float]] = {case: [] for case in cases}
    for repeat in range(args.repeats):
        for case in cases:
            seconds[case].append(beside_idle_ray(case, profile_args))
            label = "no Ray" if case is None else f"Ray + {case} idle actors"
            print(f"repeat {repeat + 1}: {label}: {seconds[case][-1]:.3f} s/step", flush=True)
    base = statistics.mean(seconds[None])
    print("\n| beside the step | s/step (each run) | mean | vs no Ray |\n|---|---|---|---|")
    for case in cases:
        label = "no Ray" if case is None else f"local Ray, {case} idle actors"
        runs = " / ".join(f"{s:.3f}" for s in seconds[case])
        print(f"| {label} | {runs} | {statistics.mean(seconds[case]):.3f} | {statistics.mean(seconds[case]) / base:.2f}x |")


if __name__ == "__main__":
    main()
