"""Where the digits demo's time goes, and what ``train_pack_timesteps`` saves: one epoch of the shipped digits
configuration (``nabla_gfn`` of the digits benchmark: 32 trajectories x 10 transitions, 4 optimizer updates) trained
with one loss call per transition index (unpacked) and with all 10 transitions of a micro-batch in one call (packed),
plus the per-epoch evaluation pass of the demo and the benchmark (128 samples, no gradient).

The two trainers are built once and their epochs alternated in one process (``--repeats`` each, after one warm-up
epoch), so both see the same machine load; the figures are medians and only their ratios are meant to be compared.

    python benchmarks/digits_epoch_cost.py [--threads 1] [--repeats 3] [--methods nabla_gfn_reference_forward]

A third variant, "packed, shared states off", is the packed trainer with every state evaluated as often as it appears
(the batches lose their trajectory numbers): a state that is one transition's x_{k-1} and the next one's x_k then goes
through the flow head twice and is decoded twice for the guess. ``--methods`` adds packed epochs of other
digits-benchmark methods to the same alternation. For every variant the rows per epoch of the denoiser (each guided row
counted once per CFG branch), of the flow head and of the VAE decoder are also counted; they do not depend on the
machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
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
                for name, pack in (("unpacked", False), ("packed", True), ("packed, shared states off", True))}
    unshared = trainers["packed, shared states off"]
    unshared.compute_loss = lambda batch, _loss=unshared.compute_loss: _loss(dataclasses.replace(batch, trajectory=None))
    for method in filter(None, args.methods.split(",")):
        trainers[method] = build_trainer(method, 0, settings, reward_fn, train_pack_timesteps=True)
    models = ("denoiser", "flow head", "VAE decoder")
    rows: dict[str, dict[str, list[int]]] = {name: {m: [0] for m in models} for name in trainers}

    def counter(count: list[int]):
        def hook(module, inputs):
            count[0] += inputs[0].shape[0]
        return hook

    for name, trainer in trainers.items():
        trainer.pipeline.denoiser.register_forward_pre_hook(counter(rows[name]["denoiser"]))
        trainer.pipeline.vae.decoder.register_forward_pre_hook(counter(rows[name]["VAE decoder"]))
        if getattr(trainer, "flow_head", None) is not None:
            trainer.flow_head.register_forward_pre_hook(counter(rows[name]["flow head"]))
    times: dict[str, list[float]] = {name: [] for name in (*trainers, "evaluation")}
    steps = {name: 0 for name in trainers}
    for epoch in range(args.repeats + 1):
        for name, trainer in trainers.items():
            t0 = time.perf_counter()
            before = {m: count[0] for m, count in rows[name].items()}
            steps[name] = trainer.step(epoch, steps[name])
            if epoch > 0:
                times[name].append(time.perf_counter() - t0)
            for m, count in rows[name].items():  # this epoch's; the last one is reported (every epoch makes the same calls)
                count.append(count[0] - before[m])
        t0 = time.perf_counter()
        sample_images(trainers["packed"].pipeline, trainers["packed"].schedule, settings, settings.eval_samples, settings.eval_seed)
        if epoch > 0:
            times["evaluation"].append(time.perf_counter() - t0)
    assert steps["packed"] == steps["unpacked"], steps  # the same optimizer updates
    med = {name: statistics.median(v) for name, v in times.items()}
    unit = med["unpacked"]
    print(f"one epoch of the shipped digits configuration ({settings.samples_per_epoch} trajectories x {settings.sample_num_steps} "
          f"transitions, {steps['packed'] // (args.repeats + 1)} updates), {args.threads} thread(s), median of {args.repeats}:")
    print(f"| part | time / unpacked training epoch | {' | '.join(f'{m} rows per epoch' for m in models)} |")
    print("|---|---|" + "---|" * len(models))
    for name in times:
        counts = [str(rows[name][m][-1]) if name in rows else "" for m in models]
        print(f"| {name} | {med[name] / unit:.3f} | {' | '.join(counts)} |")
    print(f"speed-up of packing: {med['unpacked'] / med['packed']:.2f}x per training epoch; "
          f"training + evaluation epoch: {(med['unpacked'] + med['evaluation']) / (med['packed'] + med['evaluation']):.2f}x")
    print(f"speed-up of evaluating each shared state once: {med['packed, shared states off'] / med['packed']:.2f}x per packed training epoch")
    return med


if __name__ == "__main__":
    main()
