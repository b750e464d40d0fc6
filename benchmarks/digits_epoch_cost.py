"""Where the digits demo's time goes, and what ``train_pack_timesteps`` saves: one epoch of the shipped digits
configuration (``nabla_gfn`` of the digits benchmark: 32 trajectories x 10 transitions, 4 optimizer updates) trained
with one loss call per transition index (unpacked) and with all 10 transitions of a micro-batch in one call (packed),
plus the per-epoch evaluation pass of the demo and the benchmark (128 samples, no gradient).

The two trainers are built once and their epochs alternated in one process (``--repeats`` each, after one warm-up
epoch), so both see the same machine load; the figures are medians and only their ratios are meant to be compared.

    python benchmarks/digits_epoch_cost.py [--threads 1] [--repeats 3] [--methods nabla_gfn_reference_forward]

``--methods`` adds packed epochs of other digits-benchmark methods to the same alternation. For every variant the
denoiser's evaluations per epoch are also counted (rows of its forward calls, each guided row counted once per CFG
branch), which does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of each variant (default 3)")
    p.add_argument("--methods", default="", help="comma-separated digits-benchmark methods to time and count too (packed)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from trl_gfn.evaluation.digits_benchmark import BenchmarkSettings, build_trainer, load_reward, sample_images

    settings = BenchmarkSettings()
    reward_fn = load_reward(settings.target_digits)
    trainers = {name: build_trainer("nabla_gfn", 0, settings, reward_fn, train_pack_timesteps=pack)
                for name, pack in (("unpacked", False), ("packed", True))}
    for method in filter(None, args.methods.split(",")):
        trainers[method] = build_trainer(method, 0, settings, reward_fn, train_pack_timesteps=True)
    rows: dict[str, list[int]] = {name: [0] for name in trainers}
    for name, trainer in trainers.items():
        trainer.pipeline.denoiser.register_forward_pre_hook(lambda module, inputs, _n=name: rows[_n].__setitem__(0, rows[_n][0] + inputs[0].shape[0]))
    times: dict[str, list[float]] = {name: [] for name in (*trainers, "evaluation")}
    steps = {name: 0 for name in trainers}
    for epoch in range(args.repeats + 1):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            before = rows[name][0]
            steps[name] = trainer.step(epoch, steps[name])
            if epoch > 0:
                times[name].append(time.perf_counter() - t0)
            rows[name].append(rows[name][0] - before)  # this epoch's; the last one is reported (every epoch makes the same calls)
        t0 = time.perf_counter()
        sample_images(trainers["packed"].pipeline, trainers["packed"].schedule, settings, settings.eval_samples, settings.eval_seed)
        if epoch > 0:
            times["evaluation"].append(time.perf_counter() - t0)
    assert steps["packed"] == steps["unpacked"], steps  # the same optimizer updates
    med = {name: statistics.median(v) for name, v in times.items()}
    unit = med["unpacked"]
    print(f"one epoch of the shipped digits configuration ({settings.samples_per_epoch} trajectories x {settings.sample_num_steps} "
          f"transitions, {steps['packed'] // (args.repeats + 1)} updates), {args.threads} thread(s), median of {args.repeats}:")
    print("| part | time / unpacked training epoch | denoiser rows per epoch |")
    print("|---|---|---|")
    for name in times:
        count = rows[name][-1] if name in rows else ""
        print(f"| {name} | {med[name] / unit:.3f} | {count} |")
    print(f"speed-up of packing: {med['unpacked'] / med['packed']:.2f}x per training epoch; "
          f"training + evaluation epoch: {(med['unpacked'] + med['evaluation']) / (med['packed'] + med['evaluation']):.2f}x")
    return med


if __name__ == "__main__":
    main()
