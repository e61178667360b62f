"""The README's first command on an idle machine and on a busy one: wall times and their ratio.

    .venv/bin/python benchmarks/busy_machine.py --json results/busy_machine.json
    .venv/bin/python benchmarks/busy_machine.py --env OMP_NUM_THREADS=2   # torch's default threads, as before

A laptop with a browser open is a busy machine: one other program wants a core all the time. The built-in
models must train about as fast there as on an idle machine (threads.py says why they run on one thread), so
this runs the README's command (fewer steps and class images, the same shape: class images, then training with
sample rounds) twice: once alone, once while a Python busy loop it starts itself keeps one core busy. The loop is
killed afterwards (only that process). It prints both wall times, the training processes' CPU time and the ratio
busy/idle as JSON; the goal is a ratio within ~2.

Other programs running on the machine make "idle" busy too: the load average at the start is in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_FLAGS = ["--instance-dir", "sample_data/toy_robot", "--instance-prompt", "a sks toy",
                "--class-prompt", "a toy"]


def train_command(output_dir: Path, steps: int, class_images: int, sample_every: int) -> list[str]:
    """The README's first command with the step and class-image counts scaled down."""
    return [sys.executable, "-m", "dreambooth_helpers", "train", *README_FLAGS, "--output-dir", str(output_dir),
            "--max-train-steps", str(steps), "--num-class-images", str(class_images),
            "--sample-every", str(sample_every)]


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall and CPU seconds of one training run; its output is kept only to explain a failure."""
    started, cpu = time.perf_counter(), children_cpu_s()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - started, children_cpu_s() - cpu
    if done.returncode != 0:
        raise SystemExit(f"The training command failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def start_busy_loop() -> subprocess.Popen:
    """One CPU-bound process, as a browser tab or a build would be."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def stop(process: subprocess.Popen) -> None:
    process.kill()  # this one process, which we started
    process.wait()


def measure(steps: int, class_images: int, sample_every: int, env: dict[str, str], work: Path) -> dict:
    report: dict = {"cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "env": {k: v for k, v in env.items() if k not in os.environ or os.environ[k] != v}}
    report["command"] = " ".join(train_command(Path("OUT"), steps, class_images, sample_every)[1:])
    report["idle"] = timed_run(train_command(work / "idle", steps, class_images, sample_every), env)
    busy_loop = start_busy_loop()
    try:
        report["busy"] = timed_run(train_command(work / "busy", steps, class_images, sample_every), env)
    finally:
        stop(busy_loop)
    report["ratio_busy_to_idle"] = round(report["busy"]["wall_s"] / report["idle"]["wall_s"], 2)
    return report


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env {pair!r}: write it as NAME=VALUE, e.g. --env OMP_NUM_THREADS=2.")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Training steps (the README: 1600; default 200).")
    parser.add_argument("--class-images", type=int, default=20, help="Class images (the README: 100; default 20).")
    parser.add_argument("--sample-every", type=int, help="Sample rounds every N steps (default: steps/4, as the "
                        "README's 1600/400).")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="Extra environment for the training runs, e.g. OMP_NUM_THREADS=2 (torch's default).")
    parser.add_argument("--json", help="Also write the report to this file.")
    args = parser.parse_args(argv)
    sample_every = args.sample_every or max(1, args.steps // 4)
    with tempfile.TemporaryDirectory(prefix="busy-machine-") as work:
        report = measure(args.steps, args.class_images, sample_every, parse_env(args.env), Path(work))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
