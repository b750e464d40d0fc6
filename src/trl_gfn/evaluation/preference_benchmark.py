"""The preference benchmark: every preference loss on the bundled digits model and its simulated-annotator data.

Shared by ``benchmarks/preference_alignment.py`` (all methods x seeds x minority fractions) and the tests. Not imported
by ``trl_gfn.evaluation`` itself (it pulls in the trainers).

One *run* = (method, seed, minority fraction): the bundled pipeline with a fresh LoRA is trained with
:class:`~trl_gfn.DiffusionDPOTrainer` on the bundled training pairs relabelled for that share of minority annotators
(:mod:`trl_gfn.data.digits_preferences`), the same budget for every method (epochs x batch). After every epoch the
policy samples the evaluation set: the generic prompt from held-out noises (seeds no training pair used), the same
noises the base model was sampled from; after the last epoch also the ten class prompts (prompts never seen in the
preference data). Figures (:func:`evaluate_images`):

- ``win_rate``: share of evaluation noises whose fine-tuned image beats the base model's image under the majority
  annotators' true utility U(x) = p(y ∈ {0, 6, 8, 9} | x) (deterministic, no annotator noise); a tie
  (|ΔU| < ``tie_threshold``, the annotators' own) counts one half. 0.5 = no change;
- ``utility`` (the reward: mean U), ``round_share`` (share of images with U > 0.5);
- ``diversity``: mean pairwise distance of the classifier's features (:func:`~trl_gfn.evaluation.pairwise_diversity`),
  ``prior_fd``: Fréchet distance of those features to a large base-model sample (:func:`~trl_gfn.evaluation.frechet_distance`);
- from the trainer: ``eval/implicit_acc`` on the validation pairs (relabelled like the training pairs) and the train logs.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from .metrics import classifier_outputs, frechet_distance, pairwise_diversity, win_rate

#: method -> (loss_type, config overrides, note)
METHODS: dict[str, tuple[str, dict[str, Any], str]] = {
    "dpo": ("sigmoid", {}, "Diffusion-DPO, −log σ(u)"),
    "hinge": ("hinge", {}, "max(0, 1 − u)"),
    "ipo": ("ipo", {}, "(u − ½)², IPO with τ = β"),
    "dmpo": ("dmpo", {}, "reverse KL to Bernoulli(0.99)"),
    "see": ("see", {}, "self-entropy weight γ"),
    "adaptive": ("adaptive", {}, "minority-aware weight and margin, EMA 0.9999 / 0.5"),
    "dpo_sdpo": ("sigmoid", {"winner_preserving_mu": 0.9}, "Diffusion-DPO + SDPO winner-preserving rescale (μ = 0.9)"),
}
#: Inversion-DPO's benchmark settings: N = 10 inversion steps (CPU budget), 2 trained steps per pair and update
INVERSION_BENCH = {"inversion_num_steps": 10, "inversion_train_steps": 2}
METHODS.update({
    "inversion_dpo": ("sigmoid", dict(INVERSION_BENCH), "Inversion-DPO (derived sign), N = 10 DDIM inversion steps, CFG 2, 2 trained steps per pair"),
    "inversion_dpo_released_sign": ("sigmoid", dict(INVERSION_BENCH, inversion_sign="released"),
                                    "Inversion-DPO with the released code's sign (rewards deviation on the winner's trajectory)"),
})
METHODS.update({
    "sft": ("sft", {}, "supervised fine-tuning on the preferred images (the baseline of SPIN-Diffusion)"),
    "spin": ("sigmoid", {}, "SPIN-Diffusion: self-play on the preferred images, one iteration per epoch, 1 fake per real image"),
})
#: methods trained with another trainer than DiffusionDPOTrainer: method -> (config class, trainer class) names in trl_gfn
TRAINERS = {"inversion_dpo": ("InversionDPOConfig", "InversionDPOTrainer"),
            "inversion_dpo_released_sign": ("InversionDPOConfig", "InversionDPOTrainer"),
            "spin": ("SPINDiffusionConfig", "SPINDiffusionTrainer")}
DEFAULT_METHODS = ["dpo", "hinge", "ipo", "dmpo", "see", "adaptive", "dpo_sdpo"]
#: methods and minority fractions of the robustness table (the main table's fraction is added)
ROBUSTNESS_METHODS = ["dpo", "adaptive"]
ROBUSTNESS_FRACTIONS = [0.0, 0.2, 0.3]


@dataclass
class PreferenceBenchmarkSettings:
    """Sizes and hyper-parameters shared by every run (β and the loss fields are each loss type's defaults)."""

    epochs: int = 3
    train_batch_size: int = 16
    learning_rate: float = 1e-3
    lora_rank: int = 8
    minority_fraction: float = 0.1
    train_pairs: int = 0  # 0: all bundled training pairs
    eval_samples: int = 192
    eval_class_samples: int = 16
    eval_seed: int = 10_000_000
    class_eval_seed: int = 11_000_000
    reference_samples: int = 1024
    reference_seed: int = 20_000_000
    sample_num_steps: int = 20
    guidance_scale: float = 3.0
    tie_threshold: float = 0.1
    batch: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = dict(epochs=1, train_pairs=400, eval_samples=64, eval_class_samples=4, reference_samples=256, sample_num_steps=10)


# ------------------------------------------------------------------------------------------------ sampling and scoring
@torch.no_grad()
def sample_images(pipeline, settings: PreferenceBenchmarkSettings, prompts: list[str], first_seed: int) -> torch.Tensor:
    """One image per prompt with the pipeline's current policy; image i drawn with seed ``first_seed + i`` (base and fine-tuned alike)."""
    schedule = pipeline.make_schedule("ddpm", settings.sample_num_steps, 1.0)
    out = []
    for start in range(0, len(prompts), settings.batch):
        part = prompts[start:start + settings.batch]
        gens = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(part))]
        out.append(pipeline.sample(part, schedule, guidance_scale=settings.guidance_scale, generators=gens).images.float().cpu())
    return torch.cat(out)


def eval_prompts(settings: PreferenceBenchmarkSettings) -> tuple[list[str], list[str]]:
    """(generic prompts, class prompts) of the evaluation set."""
    from ..assets import DIGITS_GENERIC_PROMPT, DIGITS_PROMPT_TEMPLATE

    return ([DIGITS_GENERIC_PROMPT] * settings.eval_samples,
            [DIGITS_PROMPT_TEMPLATE.format(d) for d in range(10) for _ in range(settings.eval_class_samples)])


@torch.no_grad()
def score(images: torch.Tensor, classifier) -> tuple[np.ndarray, np.ndarray]:
    """(majority utility U, classifier features) of images in [0, 1]."""
    from ..data.digits_preferences import round_utility

    _, feats = classifier_outputs(images, classifier)
    return round_utility(classifier, images).numpy(), feats.double().numpy()


def compute_reference(settings: PreferenceBenchmarkSettings, classifier=None, cache: str | None = None) -> dict[str, Any]:
    """The base model on the evaluation noises (utilities, features) and a larger base sample for the Fréchet distance; cached."""
    from ..data.digits_preferences import load_classifier, load_pipeline

    key = {k: getattr(settings, k) for k in ("eval_samples", "eval_class_samples", "eval_seed", "class_eval_seed", "reference_samples",
                                              "reference_seed", "sample_num_steps", "guidance_scale")}
    key["version"] = 1
    if cache and os.path.exists(cache):
        from .digits_benchmark import _numpy_globals

        with torch.serialization.safe_globals(_numpy_globals()):
            ref = torch.load(cache, weights_only=True)
        if ref.get("key") == key:
            return ref
    classifier = classifier if classifier is not None else load_classifier()
    pipeline = load_pipeline()
    t0 = time.perf_counter()
    generic, classes = eval_prompts(settings)
    u_gen, f_gen = score(sample_images(pipeline, settings, generic, settings.eval_seed), classifier)
    u_cls, _ = score(sample_images(pipeline, settings, classes, settings.class_eval_seed), classifier)
    u_ref, f_ref = score(sample_images(pipeline, settings, [generic[0]] * settings.reference_samples, settings.reference_seed), classifier)
    ref = {"key": key, "utility": u_gen, "features": f_gen, "class_utility": u_cls, "reference_features": f_ref, "reference_utility": u_ref,
           "seconds": time.perf_counter() - t0,
           "fd_floor": frechet_distance(f_gen, f_ref), "diversity": pairwise_diversity(f_gen)}
    if cache:
        os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
        torch.save(ref, cache)
    return ref


def evaluate_images(utility: np.ndarray, features: np.ndarray, reference: dict[str, Any], tie_threshold: float,
                    class_utility: np.ndarray | None = None) -> dict[str, Any]:
    """The figures of one evaluation (see the module docstring) against the base model's images of the same noises."""
    wins = win_rate(utility, reference["utility"], tie_threshold)
    out = {"win_rate": wins["win_rate"], "win_rate_se": wins["stderr"], "utility": float(np.mean(utility)),
           "round_share": float(np.mean(utility > 0.5)), "diversity": pairwise_diversity(features),
           "prior_fd": frechet_distance(features, reference["reference_features"])}
    if class_utility is not None:
        out["class_win_rate"] = win_rate(class_utility, reference["class_utility"], tie_threshold)["win_rate"]
    return out


def base_record(reference: dict[str, Any], tie_threshold: float) -> dict[str, Any]:
    """The base model's own figures (win rate 1/2 by definition)."""
    return dict(evaluate_images(reference["utility"], reference["features"], reference, tie_threshold, reference["class_utility"]),
                epoch=0, update_step=0, wall_time=0.0)


# ------------------------------------------------------------------------------------------------ one run
def method_config(method: str, seed: int, settings: PreferenceBenchmarkSettings, logdir: str | None = None, **overrides):
    """The :class:`~trl_gfn.DiffusionDPOConfig` (:class:`~trl_gfn.InversionDPOConfig` for Inversion-DPO) of ``method`` in this benchmark."""
    import trl_gfn.configs as configs

    loss_type, method_overrides, _ = METHODS[method]
    kwargs = dict(loss_type=loss_type, num_epochs=settings.epochs, train_batch_size=settings.train_batch_size,
                  train_learning_rate=settings.learning_rate, lora_rank=settings.lora_rank, seed=seed, save_freq=0,
                  logdir=logdir or tempfile.mkdtemp(prefix="preference_bench_"), run_name=f"{method}_seed{seed}", eval_freq=1)
    kwargs.update(method_overrides)
    kwargs.update(overrides)
    if method == "spin":  # one self-play iteration per epoch of the budget
        kwargs.update(spin_num_iterations=settings.epochs, spin_epochs_per_iteration=1)
    return getattr(configs, TRAINERS.get(method, ("DiffusionDPOConfig",))[0])(**kwargs)


def training_data(settings: PreferenceBenchmarkSettings, minority_fraction: float):
    """(train, validation) bundled pairs relabelled for ``minority_fraction`` (train cut to ``train_pairs`` when set)."""
    from ..data.digits_preferences import load_digits_preferences

    train = load_digits_preferences("train", minority_fraction=minority_fraction)
    if settings.train_pairs:
        train = train.select(range(min(settings.train_pairs, len(train))))
    return train, load_digits_preferences("validation", minority_fraction=minority_fraction)


def run_method(method: str, seed: int, minority_fraction: float, settings: PreferenceBenchmarkSettings, reference: dict[str, Any],
               classifier=None, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``method`` and evaluate after every epoch; returns the run's records (no images)."""
    from ..data.digits_preferences import load_classifier, load_pipeline
    from ..testing import reset_accelerate_state
    from .. import trainers

    classifier = classifier if classifier is not None else load_classifier()
    reset_accelerate_state()
    train, validation = training_data(settings, minority_fraction)
    config = method_config(method, seed, settings)
    trainer_class = getattr(trainers, TRAINERS[method][1]) if method in TRAINERS else trainers.DiffusionDPOTrainer
    trainer = trainer_class(config, load_pipeline(), train, validation)
    generic, classes = eval_prompts(settings)
    records = [base_record(reference, settings.tie_threshold)]
    global_step, wall = 0, 0.0
    for epoch in range(settings.epochs):
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        wall += time.perf_counter() - t0
        u, f = score(sample_images(trainer.pipeline, settings, generic, settings.eval_seed), classifier)
        u_cls = None
        if epoch == settings.epochs - 1:
            u_cls, _ = score(sample_images(trainer.pipeline, settings, classes, settings.class_eval_seed), classifier)
        rec = {"epoch": epoch + 1, "update_step": global_step, "wall_time": wall}
        rec.update(evaluate_images(u, f, reference, settings.tie_threshold, u_cls))
        m = trainer.last_metrics
        rec.update({k: m[k] for k in ("eval/implicit_acc", "eval/loss", "eval/winner_gap", "eval/loser_gap") if k in m})
        if not all(math.isfinite(v) for v in (rec["win_rate"], rec["diversity"], rec["prior_fd"])):
            rec["non_finite"] = True
        records.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    result = {"method": method, "seed": seed, "minority_fraction": minority_fraction, "note": METHODS[method][2],
              "beta": config.effective_beta, "config": {k: v for k, v in config.to_public_dict().items() if not isinstance(v, dict)},
              "data": trainer.train_pairs.report.as_log("train"), "records": records}
    trainer.accelerator.end_training()
    return result


# ------------------------------------------------------------------------------------------------ summaries
TABLE_KEYS = [("win_rate", "win rate vs base"), ("class_win_rate", "win rate, class prompts"), ("utility", "utility (reward)"),
              ("round_share", "round share"), ("diversity", "diversity"), ("prior_fd", "prior FD"), ("eval/implicit_acc", "val. implicit acc.")]
CURVE_KEYS = [("win_rate", "win rate vs base (majority utility)"), ("round_share", "share of round digits"), ("diversity", "diversity (features)"),
              ("prior_fd", "Fréchet distance to the base model")]


def fmt(values, digits: int = 3) -> str:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return "–"
    if values.size > 1:
        return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"
    return f"{values.mean():.{digits}f}"


def group(runs: list[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        out.setdefault((r["method"], float(r["minority_fraction"])), []).append(r)
    return out


def main_table(runs: list[dict[str, Any]], fraction: float, reference: dict[str, Any], tie_threshold: float) -> str:
    """Final figures per method at minority ``fraction``: mean ± std over seeds; the base model first."""
    base = base_record(reference, tie_threshold)
    lines = ["| method | β | seeds | updates | train s | " + " | ".join(n for _, n in TABLE_KEYS) + " |", "|" + "---|" * (5 + len(TABLE_KEYS))]
    lines.append("| base model | – | – | 0 | 0 | " + " | ".join(fmt([base.get(k)]) if k in base else "–" for k, _ in TABLE_KEYS) + " |")
    for (m, f), rs in group(runs).items():
        if f != fraction:
            continue
        last = [r["records"][-1] for r in rs]
        lines.append(f"| {m} | {rs[0]['beta']:g} | {len(rs)} | {last[0]['update_step']} | {fmt([x['wall_time'] for x in last], 0)} | "
                     + " | ".join(fmt([x.get(k) for x in last]) for k, _ in TABLE_KEYS) + " |")
    return "\n".join(lines) + "\n"


def epoch_table(runs: list[dict[str, Any]], fraction: float, key: str = "win_rate") -> str:
    """``key`` after every epoch (mean ± std over seeds) per method at minority ``fraction``: how fast each method gets there."""
    groups = {m: rs for (m, f), rs in group(runs).items() if f == fraction}
    epochs = max((len(r["records"]) - 1 for rs in groups.values() for r in rs), default=0)
    lines = ["| method | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " | train s |", "|" + "---|" * (epochs + 2)]
    for m, rs in groups.items():
        cells = [fmt([r["records"][e].get(key) for r in rs if len(r["records"]) > e]) for e in range(1, epochs + 1)]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt([r['records'][-1]['wall_time'] for r in rs], 0)} |")
    return "\n".join(lines) + "\n"


def robustness_table(runs: list[dict[str, Any]], methods: list[str]) -> str:
    """Final win rate (mean ± std over seeds) per method and minority fraction."""
    groups = group(runs)
    fractions = sorted({f for (m, f) in groups if m in methods})
    lines = ["| method | " + " | ".join(f"{100 * f:.0f} % minority labels" for f in fractions) + " |", "|" + "---|" * (1 + len(fractions))]
    for m in methods:
        cells = [fmt([r["records"][-1]["win_rate"] for r in groups.get((m, f), [])]) for f in fractions]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], fraction: float, path: str, robustness_methods: list[str], title: str = "") -> None:
    """Curves at minority ``fraction`` (win rate, round share, diversity, prior FD vs update step; mean ± std over seeds) and the
    robustness panel (final win rate vs minority fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS) + 1, figsize=(4 * (len(CURVE_KEYS) + 1), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = group(runs)
    methods = list(dict.fromkeys(m for (m, _) in groups))
    for i, m in enumerate(methods):
        rs = groups.get((m, fraction))
        if not rs:
            continue
        n = min(len(r["records"]) for r in rs)
        x = np.mean([[rec["update_step"] for rec in r["records"][:n]] for r in rs], axis=0)
        for col, (k, name) in enumerate(CURVE_KEYS):
            y = np.array([[rec[k] for rec in r["records"][:n]] for r in rs], dtype=float)
            mu, sd = y.mean(0), (y.std(0, ddof=1) if len(rs) > 1 else np.zeros(n))
            ax = axes[0, col]
            ax.plot(x, mu, color=colors[i % len(colors)], label=m, marker="o", ms=3)
            ax.fill_between(x, mu - sd, mu + sd, color=colors[i % len(colors)], alpha=0.15, lw=0)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("update steps")
            ax.grid(alpha=0.3)
    ax = axes[0, -1]
    for m in robustness_methods:
        fs = sorted(f for (mm, f) in groups if mm == m)
        if not fs:
            continue
        ys = [[r["records"][-1]["win_rate"] for r in groups[(m, f)]] for f in fs]
        ax.errorbar([100 * f for f in fs], [np.mean(y) for y in ys], yerr=[np.std(y, ddof=1) if len(y) > 1 else 0 for y in ys],
                    color=colors[methods.index(m) % len(colors)], marker="o", capsize=3, label=m)
    ax.set_title("final win rate vs minority labels", fontsize=10)
    ax.set_xlabel("% minority (flipped) labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


__all__ = ["DEFAULT_METHODS", "METHODS", "PreferenceBenchmarkSettings", "QUICK", "ROBUSTNESS_FRACTIONS", "TRAINERS", "epoch_table", "ROBUSTNESS_METHODS", "base_record",
           "compute_reference", "evaluate_images", "main_table", "method_config", "plot", "robustness_table", "run_method", "sample_images",
           "score", "training_data"]
