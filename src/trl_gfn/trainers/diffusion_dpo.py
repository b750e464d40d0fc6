"""Diffusion-DPO and its successors on one offline trainer: preference pairs in, a LoRA out.

Per pair (preferred image w, other image l, caption c): both images are VAE-encoded, one timestep t and one noise ε
are drawn and shared by the two, and the denoising errors err = mean over latent elements of ‖target − model(x_t)‖²
are computed for the policy (LoRA on, with gradient) and the reference (adapter off, no gradient); the loss of
``config.loss_type`` (:mod:`trl_gfn.losses.preference`) turns them into one number per pair. The noise, timestep,
VAE sample and flips of a pair come from a generator seeded by (seed, epoch, dataset row): a pair sees the same
randomness whatever the batch size, the number of processes, or a resume.

Subclasses (online or self-play variants) change one piece each: :meth:`make_pair_inputs` (how the noisy latents are
built), :meth:`reference_errors` (what the reference is), :meth:`auxiliary_errors` (further models the loss compares
with), :meth:`preference_loss` (the loss of the errors).
Cost per pair: 2 UNet forwards + 2 backwards (policy) and 2 forwards without gradient (reference); Adaptive-DPO adds
2 forwards without gradient per EMA copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ..configs.dpo import LOSS_FIELDS, DiffusionDPOConfig
from ..data.preference import PairBatch, PreferencePairs
from ..losses import preference as L
from ..diffusion import ForwardProcess
from .base import BaseDiffusionTrainer, sample_seed
from .ema import LoraEMA

logger = get_logger(__name__)

_DPO_CITATION = """@inproceedings{wallace2024diffusion,
  title     = {Diffusion Model Alignment Using Direct Preference Optimization},
  author    = {Bram Wallace and Meihua Dang and Rafael Rafailov and Linqi Zhou and Aaron Lou and Senthil Purushwalkam and Stefano Ermon and Caiming Xiong and Shafiq Joty and Nikhil Naik},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024},
  eprint    = {2311.12908}
}"""
#: loss type -> (method name, model-card tag, paper, extra citation)
METHODS: dict[str, tuple[str, str, str, str]] = {
    "sigmoid": ("Diffusion-DPO", "diffusion-dpo", "Wallace et al., *Diffusion Model Alignment Using Direct Preference Optimization*, CVPR 2024, arXiv:2311.12908", ""),
    "hinge": ("Diffusion-DPO (hinge loss)", "diffusion-dpo", "Wallace et al., CVPR 2024, arXiv:2311.12908, with the hinge (SLiC) loss", ""),
    "ipo": ("Diffusion-IPO", "diffusion-ipo", "Azar et al., *A General Theoretical Paradigm to Understand Learning from Human Preferences*, AISTATS 2024, arXiv:2310.12036, on Diffusion-DPO's ELBO", """@inproceedings{azar2024general,
  title     = {A General Theoretical Paradigm to Understand Learning from Human Preferences},
  author    = {Mohammad Gheshlaghi Azar and Mark Rowland and Bilal Piot and Daniel Guo and Daniele Calandriello and Michal Valko and R{\\'e}mi Munos},
  booktitle = {International Conference on Artificial Intelligence and Statistics (AISTATS)},
  year      = {2024},
  eprint    = {2310.12036}
}"""),
    "dmpo": ("DMPO", "dmpo", "Li, Xu, Dang, Ermon, *Divergence Minimization Preference Optimization for Diffusion Model Alignment*, arXiv:2507.07510", """@article{li2025divergence,
  title   = {Divergence Minimization Preference Optimization for Diffusion Model Alignment},
  author  = {Binxu Li and Minkai Xu and Meihua Dang and Stefano Ermon},
  journal = {arXiv preprint arXiv:2507.07510},
  year    = {2025}
}"""),
    "see": ("SEE-DPO", "see-dpo", "Shekhar, Singh, Zhang, *SEE-DPO: Self Entropy Enhanced Direct Preference Optimization*, TMLR 2025, arXiv:2411.04712", """@article{shekhar2025seedpo,
  title   = {{SEE-DPO}: Self Entropy Enhanced Direct Preference Optimization},
  author  = {Shivanshu Shekhar and Shreyas Singh and Tong Zhang},
  journal = {Transactions on Machine Learning Research},
  year    = {2025},
  eprint  = {2411.04712}
}"""),
    "sft": ("supervised fine-tuning on preferred images", "sft", "the supervised fine-tuning baseline of Wallace et al., CVPR 2024 (the denoising loss on the preferred image of each pair)", ""),
    "adaptive": ("Adaptive-DPO", "adaptive-dpo", "Zhang et al., *When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive DPO*, arXiv:2503.16921", """@article{zhang2025preferences,
  title   = {When Preferences Diverge: Aligning Diffusion Models with Minority-Aware Adaptive {DPO}},
  author  = {Lingfan Zhang and Chen Liu and Chengming Xu and Kai Hu and Donghao Luo and Chengjie Wang and Yanwei Fu and Yuan Yao},
  journal = {arXiv preprint arXiv:2503.16921},
  year    = {2025},
  eprint  = {2503.16921}
}"""),
}
_SDPO = ("Fu et al., *Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models*, arXiv:2511.03317",
         """@article{fu2025diffusionsdpo,
  title   = {Diffusion-{SDPO}: Safeguarded Direct Preference Optimization for Diffusion Models},
  author  = {Minghao Fu and Guo-Hua Wang and Tianyu Cui and Qing-Guo Chen and Zhao Xu and Weihua Luo and Kaifu Zhang},
  journal = {arXiv preprint arXiv:2511.03317},
  year    = {2025}
}""")


@dataclass
class PairInputs:
    """What the UNet sees for a batch of pairs: noisy latents of both images at a shared timestep and noise, and targets."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_w: torch.Tensor
    noisy_l: torch.Tensor
    target_w: torch.Tensor
    target_l: torch.Tensor
    prompt_embeds: torch.Tensor


@dataclass
class Denoised:
    """Errors (B,) and raw predictions (B, C, h, w) of one model on the winners and the losers."""

    err_w: torch.Tensor
    err_l: torch.Tensor
    pred_w: torch.Tensor
    pred_l: torch.Tensor


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``.

    Warm-up: step s < w uses (s + 1)/w; then ``constant_with_warmup`` stays at 1, ``linear`` decays as
    (total − s)/(total − w), ``cosine`` as (1 + cos(π (s − w)/(total − w)))/2; ``constant`` is 1 throughout.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant_with_warmup":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler: unknown schedule {schedule!r}")


class DiffusionDPOTrainer(BaseDiffusionTrainer):
    """Fine-tune a diffusion model's LoRA on preference pairs with Diffusion-DPO, IPO, hinge, DMPO, SEE-DPO or Adaptive-DPO.

    Usage::

        trainer = DiffusionDPOTrainer(DiffusionDPOConfig(loss_type="dmpo"), pipeline, train_dataset, eval_dataset)
        trainer.train()
        trainer.push_to_hub("me/sd15-dmpo-lora")

    Args:
        config: a :class:`~trl_gfn.configs.DiffusionDPOConfig`.
        pipeline: a :class:`~trl_gfn.pipelines.DiffusionPipelineForRL` (a diffusers Stable Diffusion pipeline is wrapped).
        train_dataset: a ``datasets.Dataset`` in the Pick-a-Pic layout (:mod:`trl_gfn.data.preference`); checked row by
            row before training (``invalid_rows``, ``tie_handling``, ``verify_images``).
        eval_dataset: optional pairs on which loss, implicit accuracy and error gaps are logged every ``eval_freq`` epochs
            (``eval/...``), with a fixed noise per pair.

    Logged per optimizer step: ``loss``, ``implicit_acc`` (share of pairs with u > 0), ``logit_mean`` (u),
    ``winner_gap`` / ``loser_gap`` (err_θ − err_ref on each side), ``model_mse`` / ``ref_mse``; Adaptive-DPO adds
    ``adaptive_weight`` and ``adaptive_metric``, the winner-preserving rescale ``loser_grad_scale``.
    """

    config_class = DiffusionDPOConfig
    method_tag = "diffusion-dpo"

    def __init__(self, config: DiffusionDPOConfig, pipeline, train_dataset, eval_dataset=None) -> None:
        if train_dataset is None:
            raise TypeError("train_dataset: a datasets.Dataset of preference pairs is required (Pick-a-Pic layout: caption, jpg_0, jpg_1, label_0)")
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        name, tag, paper, citation = METHODS[config.loss_type] if isinstance(config, DiffusionDPOConfig) else METHODS["sigmoid"]
        self.method_name, self.method_tag, self.paper = name, tag, paper
        self.citation = "\n\n".join(c for c in (_DPO_CITATION, citation) if c)
        if isinstance(config, DiffusionDPOConfig) and config.winner_preserving_mu is not None:
            self.method_name += " + SDPO winner preserving"
            self.paper += f"; winner-preserving rescale: {_SDPO[0]}"
            self.citation += "\n\n" + _SDPO[1]
        self.ema: LoraEMA | None = None
        super().__init__(config, pipeline)

    @property
    def card_fields(self) -> list[str]:  # type: ignore[override]
        c = self.config
        fields = ["loss_type", "beta", "lora_rank", "train_learning_rate", "lr_scheduler", "num_epochs", "train_batch_size",
                  "train_gradient_accumulation_steps", *LOSS_FIELDS.get(c.loss_type, ())]
        return fields + (["winner_preserving_mu"] if c.winner_preserving_mu is not None else [])

    # ------------------------------------------------------------------ set-up
    def setup_components(self) -> None:
        """Check the datasets (before any training) and take the noise schedule's constants from the pipeline's scheduler."""
        c, acc = self.config, self.accelerator
        resolution = c.resolution or min(self.pipeline.image_size)
        common = dict(resolution=resolution, random_flip=c.random_flip, tie_handling=c.tie_handling, invalid_rows=c.invalid_rows,
                      verify_images=c.verify_images)
        self.train_pairs = PreferencePairs(self.train_dataset, name="train_dataset", **common)
        self.eval_pairs = PreferencePairs(self.eval_dataset, name="eval_dataset", **dict(common, random_flip=False)) \
            if self.eval_dataset is not None else None
        per_step = c.train_batch_size * acc.num_processes * c.train_gradient_accumulation_steps
        if len(self.train_pairs) < per_step:
            raise ValueError(f"train_dataset: {len(self.train_pairs)} usable pair(s) ({self.train_pairs.report.ties_dropped} ties dropped, "
                             f"{self.train_pairs.report.invalid_skipped} invalid rows skipped) are fewer than one optimizer step takes: "
                             f"train_batch_size {c.train_batch_size} x {acc.num_processes} process(es) x train_gradient_accumulation_steps "
                             f"{c.train_gradient_accumulation_steps} = {per_step}")
        #: the model's training forward process (VP noising with its prediction_type's target, or flow matching's), see
        #: :class:`~trl_gfn.diffusion.ForwardProcess`
        self.forward_process = ForwardProcess.from_scheduler(self.pipeline.scheduler, device=acc.device)
        self.prediction_type = self.forward_process.prediction_type
        self.num_train_timesteps = self.forward_process.num_train_timesteps
        #: ᾱ of every training timestep of a variance-preserving scheduler (None for a flow-matching model: see forward_process)
        alphas = getattr(self.pipeline.scheduler, "alphas_cumprod", None)
        self.alphas_cumprod = alphas.to(device=acc.device, dtype=torch.float32) if self.prediction_type != "flow" and alphas is not None else None
        self.beta = c.effective_beta

    def finish_setup(self) -> None:
        """EMA copies of the LoRA for Adaptive-DPO (from the LoRA as initialised or loaded by ``init_from``), the peak learning rates."""
        c = self.config
        if c.loss_type == "adaptive":
            named = [(n, p) for n, p in self.pipeline.denoiser.named_parameters() if any(p is q for q in self.pipeline.lora_parameters())]
            self.ema = LoraEMA(named, c.adaptive_ema_decays)
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        micro = len(self.train_pairs) // (c.train_batch_size * self.accelerator.num_processes)
        self.steps_per_epoch = micro // c.train_gradient_accumulation_steps
        self.total_steps = self.steps_per_epoch * c.num_epochs
        self._data_logged = False

    # ------------------------------------------------------------------ per-pair randomness and inputs
    def pair_generators(self, rows: Sequence[int], epoch: int | None) -> list[torch.Generator]:
        """One generator per pair seeded by (seed, epoch, row); ``epoch=None`` gives the fixed evaluation noise."""
        seed = self.config.seed
        return [torch.Generator().manual_seed(sample_seed(seed, 13, row) if epoch is None else sample_seed(seed, epoch, row, 11)) for row in rows]

    def make_pair_inputs(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> PairInputs:
        """Encode both images, draw a timestep and a noise per pair (shared by winner and loser), noise the latents.

        Draws per pair, from its generator and after the flips: VAE sample of the winner, then of the loser, the
        timestep, the noise. Noising and targets are the model's forward process (:class:`~trl_gfn.diffusion.ForwardProcess`):
        for UNets the scheduler's ``prediction_type`` (ε, v = √ᾱ ε − √(1−ᾱ) x₀, or x₀); for flow models (SD3)
        x_σ = (1 − σ) x₀ + σ ε with target ε − x₀. ``timesteps`` holds the denoiser's timestep.
        """
        device = self.accelerator.device
        latents_w, latents_l = self.encode_pair_latents(batch, generators)
        t = torch.cat([torch.randint(0, self.num_train_timesteps, (1,), generator=g) for g in generators]).to(device)
        noise = torch.stack([torch.randn(latents_w.shape[1:], generator=g) for g in generators]).to(device)
        fp = self.forward_process
        noisy_w, noisy_l = fp.add_noise(latents_w, noise, t), fp.add_noise(latents_l, noise, t)
        target_w, target_l = fp.target(latents_w, noise, t), fp.target(latents_l, noise, t)
        t = fp.model_timesteps[t]  # the denoiser's timestep (t itself for UNets, 1000·σ_t for flows)
        embeds = self.pipeline.encode_prompts(batch.captions, image_size=tuple(batch.winners.shape[-2:])).to(device)  # SDXL: size ids
        return PairInputs(latents_w, latents_l, noise, t, noisy_w, noisy_l, target_w, target_l, embeds)

    def encode_pair_latents(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean latents (float32) of the winners and the losers: a VAE posterior sample each, winners' draws first."""
        latents = self.pipeline.encode_images(torch.cat([batch.winners, batch.losers]).to(self.accelerator.device), list(generators) * 2)
        latents_w, latents_l = latents.float().chunk(2)
        return latents_w, latents_l

    def denoise(self, unet: torch.nn.Module, inputs: PairInputs) -> Denoised:
        """One batched UNet call on the winners' and losers' noisy latents; errors averaged over the latent's elements."""
        x = torch.cat([inputs.noisy_w, inputs.noisy_l])
        pred = self.pipeline.model_output(unet, x, inputs.timesteps.repeat(2), inputs.prompt_embeds.repeat(2, 1, 1))
        pred_w, pred_l = pred.chunk(2)
        err_w = (pred_w - inputs.target_w).pow(2).mean(dim=(1, 2, 3))
        err_l = (pred_l - inputs.target_l).pow(2).mean(dim=(1, 2, 3))
        return Denoised(err_w, err_l, pred_w, pred_l)

    def policy_errors(self, inputs: PairInputs) -> Denoised:
        """The policy (LoRA on) through the prepared model, with gradient."""
        return self.denoise(self.wrapped("unet"), inputs)

    @torch.no_grad()
    def reference_errors(self, inputs: PairInputs) -> Denoised:
        """The reference: the same UNet with the adapter disabled, without gradient."""
        with self.pipeline.reference_mode():
            return self.denoise(self.pipeline.denoiser, inputs)

    # ------------------------------------------------------------------ the loss
    @torch.no_grad()
    def auxiliary_errors(self, inputs: PairInputs) -> list[Denoised]:
        """Errors of further models the loss compares with (Adaptive-DPO: each EMA copy of the LoRA), without gradient.

        Computed before the policy's forward pass: swapping an EMA copy into the parameters writes them in place.
        """
        out = []
        for k in range(len(self.ema.decays) if self.ema is not None else 0):
            with self.ema.swapped(k):
                out.append(self.denoise(self.pipeline.denoiser, inputs))
        return out

    def preference_loss(self, errors: L.PairErrors, others: Sequence[Denoised], batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (B,) of ``config.loss_type`` and its extra diagnostics; ``others``: :meth:`auxiliary_errors`."""
        c, beta, labels = self.config, self.beta, batch.labels.to(errors.policy_w.device)
        extra: dict[str, torch.Tensor] = {}
        if c.loss_type == "sft":
            return errors.policy_w, extra
        if c.loss_type == "see":
            u = L.see_logit(errors, beta, c.see_gamma)
            return L.soft_label_loss(L.sigmoid_loss, u, labels), extra
        u = L.dpo_logit(errors, beta)
        if c.loss_type == "adaptive":
            logits = [u.detach()] + [L.dpo_logit(L.PairErrors(e.err_w, e.err_l, errors.ref_w, errors.ref_l), beta) for e in others]
            metric = L.adaptive_metric(torch.stack(logits), c.adaptive_rho)
            losses, weight = L.adaptive_loss(u, metric, c.adaptive_temperature, c.adaptive_intercept, c.adaptive_margin)
            extra.update(adaptive_metric=metric.mean(), adaptive_weight=weight.mean())
            return losses, extra
        fn = {"sigmoid": L.sigmoid_loss, "hinge": L.hinge_loss, "ipo": L.ipo_loss,
              "dmpo": lambda v: L.dmpo_loss(v, c.dmpo_alpha)}[c.loss_type]
        return L.soft_label_loss(fn, u, labels), extra

    @torch.no_grad()
    def denoise_without_grad(self, inputs: PairInputs) -> Denoised:
        """The UNet as its parameters currently are (e.g. an EMA copy swapped in), without gradient."""
        return self.denoise(self.pipeline.denoiser, inputs)

    def compute_loss(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean loss of a batch of pairs and its diagnostics (detached scalars)."""
        c = self.config
        inputs = self.make_pair_inputs(batch, generators)
        ref = self.reference_errors(inputs)
        others = self.auxiliary_errors(inputs)
        pol = self.policy_errors(inputs)
        err_l = pol.err_l
        extra: dict[str, torch.Tensor] = {}
        if c.winner_preserving_mu is not None:
            scale = L.winner_preserving_scale(pol.pred_w - inputs.target_w, pol.pred_l - inputs.target_l, c.winner_preserving_mu)
            err_l = L.scale_gradient(pol.err_l, scale)
            extra["loser_grad_scale"] = scale.mean()
        errors = L.PairErrors(pol.err_w, err_l, ref.err_w, ref.err_l)
        losses, method_terms = self.preference_loss(errors, others, batch)
        loss = losses.mean()
        with torch.no_grad():
            u = L.dpo_logit(errors, self.beta)
            terms = {"loss": loss.detach(), "implicit_acc": L.implicit_accuracy(u), "logit_mean": u.mean(),
                     "winner_gap": errors.winner_gap.mean(), "loser_gap": errors.loser_gap.mean(),
                     "model_mse": 0.5 * (pol.err_w + pol.err_l).mean().detach(), "ref_mse": 0.5 * (ref.err_w + ref.err_l).mean()}
        terms.update({k: v.detach() for k, v in {**method_terms, **extra}.items()})
        return loss, terms

    # ------------------------------------------------------------------ the loop
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of the epoch (positions in the kept pairs), from a permutation seeded by (seed, epoch).

        Micro-batch j of process p takes the (j·P + p)-th block of ``train_batch_size`` pairs; an epoch uses whole optimizer
        steps only (the last ``len mod (B·P·accumulation)`` pairs of the permutation wait for another epoch's order).
        """
        c, acc = self.config, self.accelerator
        order = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(sample_seed(c.seed, epoch, 5))).tolist()
        B, P = c.train_batch_size, acc.num_processes
        usable = self.steps_per_epoch * c.train_gradient_accumulation_steps
        return [order[(j * P + acc.process_index) * B:(j * P + acc.process_index + 1) * B] for j in range(usable)]

    def optimizer_step(self, loss_value: torch.Tensor, epoch: int) -> dict[str, float] | None:
        """Set the scheduled learning rate, step (base class), then move the EMA copies (Adaptive-DPO)."""
        if self.accelerator.sync_gradients:
            factor = lr_factor(self.config.lr_scheduler, self.state.global_step, self.config.lr_warmup_steps, self.total_steps)
            for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                group["lr"] = peak * factor
        info = super().optimizer_step(loss_value, epoch)
        if info is not None and self.ema is not None:
            self.ema.update()
        return info

    def step(self, epoch: int, global_step: int) -> int:
        """One pass over the pairs (this process's share), then evaluation and a checkpoint when due; a checkpoint every
        ``save_steps`` updates inside it. After a resume from such a checkpoint the epoch's micro-batches already trained
        are skipped (the order of an epoch is fixed by the seed, so the rest is what the uninterrupted run trained)."""
        c = self.config
        start = time.time()
        if not self._data_logged:
            self._data_logged = True
            logs = self.train_pairs.report.as_log("data/train")
            if self.eval_pairs is not None:
                logs.update(self.eval_pairs.report.as_log("data/eval"))
            self.log(logs, step=global_step)
        self.start_updates()
        batches = self.epoch_batches(epoch)
        done = self.state.epoch_updates * c.train_gradient_accumulation_steps  # > 0 only when resumed inside this epoch
        if done:
            logger.info(f"Epoch {epoch}: resuming after its first {self.state.epoch_updates} updates ({done} micro-batches)")
        for j in tqdm(range(done, len(batches)), desc=f"Epoch {epoch}: training", disable=self.hide_progress, leave=False,
                      initial=done, total=len(batches)):
            idx = batches[j]
            rows = [self.train_pairs.rows[i] for i in idx]
            generators = self.pair_generators(rows, epoch)
            batch = self.train_pairs.load(idx, generators)
            self.note_prompts(batch.captions)
            before = global_step
            global_step = self.train_micro_batch(lambda: self.compute_loss(batch, generators), epoch, global_step)
            if global_step != before:
                self.state.epoch_updates += 1
                if c.save_steps and global_step % c.save_steps == 0 and j + 1 < len(batches):
                    self.save_checkpoint()  # checkpoint_<epoch>_step_<global_step>
        self.state.epoch = epoch + 1
        self.state.epoch_updates = 0
        self.state.global_step = global_step
        if self.eval_pairs is not None and c.eval_freq and (epoch + 1) % c.eval_freq == 0:
            self.log({f"eval/{k}": v for k, v in self.evaluate().items()}, step=global_step)
        self.log({"epoch_seconds": time.time() - start}, step=global_step)
        steps_due = c.save_steps and global_step % c.save_steps == 0
        if (c.save_freq and (epoch + 1) % c.save_freq == 0) or steps_due:
            self.save_checkpoint()
        return global_step

    def check_mid_epoch_resume(self, path: str, manifest: dict[str, Any]) -> None:
        """A checkpoint written inside an epoch continues exactly only with the same pairs per update (processes ×
        ``train_batch_size`` × ``train_gradient_accumulation_steps``): the epoch's order is cut into updates of that size;
        and with the same ``seed``, which fixes that order (another would train some pairs twice in the epoch, others never)."""
        from .checkpoints import CheckpointError

        c, saved = self.config, manifest["config"]
        if saved.get("seed") != c.seed:
            raise CheckpointError(
                f"resume_from: {path} was written inside epoch {self.state.epoch}, whose order of pairs comes from seed {saved.get('seed')}; "
                f"this run has seed {c.seed}, so the rest of that epoch would not be the rest of its order. Resume with seed "
                f"{saved.get('seed')}, or from an epoch checkpoint (checkpoint_<epoch>)")
        now = (self.accelerator.num_processes, c.train_batch_size, c.train_gradient_accumulation_steps)
        then = (manifest["num_processes"], saved.get("train_batch_size"), saved.get("train_gradient_accumulation_steps"))
        if now != then:
            raise CheckpointError(
                f"resume_from: {path} was written inside epoch {self.state.epoch}, after {self.state.epoch_updates} updates of "
                f"{then[0]} process(es) x train_batch_size {then[1]} x train_gradient_accumulation_steps {then[2]} pairs; this run has "
                f"{now[0]} x {now[1]} x {now[2]}, so it cannot continue that epoch where it stopped. Resume with the checkpoint's "
                "numbers, or from an epoch checkpoint (checkpoint_<epoch>)")
        if self.state.epoch_updates >= self.steps_per_epoch:
            raise CheckpointError(f"resume_from: {path} says {self.state.epoch_updates} updates of epoch {self.state.epoch} were made, "
                                  f"but an epoch of this train_dataset has {self.steps_per_epoch}")

    @torch.no_grad()
    def evaluate(self, pairs: PreferencePairs | None = None) -> dict[str, float]:
        """Loss, implicit accuracy, mean logit and error gaps over ``pairs`` (default the eval dataset), each pair with a fixed
        noise (seeded by (seed, row), the same at every evaluation); the pairs are shared out over the processes."""
        from accelerate.utils import gather_object

        pairs = pairs if pairs is not None else self.eval_pairs
        if pairs is None:
            raise ValueError("evaluate: no eval_dataset was given")
        acc, B = self.accelerator, self.config.train_batch_size
        mine = list(range(acc.process_index, len(pairs), acc.num_processes))
        per_pair: list[tuple[float, float, float, float]] = []
        for start in range(0, len(mine), B):
            idx = mine[start:start + B]
            generators = self.pair_generators([pairs.rows[i] for i in idx], None)
            batch = pairs.load(idx, generators)
            inputs = self.make_pair_inputs(batch, generators)
            ref, others, pol = self.reference_errors(inputs), self.auxiliary_errors(inputs), self.denoise_without_grad(inputs)
            errors = L.PairErrors(pol.err_w, pol.err_l, ref.err_w, ref.err_l)
            losses, _ = self.preference_loss(errors, others, batch)
            u = L.dpo_logit(errors, self.beta)
            per_pair += list(zip(losses.tolist(), u.tolist(), errors.winner_gap.tolist(), errors.loser_gap.tolist()))
        rows = gather_object(per_pair) if acc.num_processes > 1 else per_pair
        arr = np.asarray(rows, dtype=np.float64)
        u = torch.from_numpy(arr[:, 1])
        return {"loss": float(arr[:, 0].mean()), "implicit_acc": float(L.implicit_accuracy(u)), "logit_mean": float(arr[:, 1].mean()),
                "winner_gap": float(arr[:, 2].mean()), "loser_gap": float(arr[:, 3].mean()), "pairs": float(len(arr))}

    # ------------------------------------------------------------------ checkpoints and cards
    def checkpoint_state(self) -> dict[str, Any]:
        """A digest of the kept training pairs (rows, orientation, labels): resuming on other data is refused."""
        return {"train_pairs": len(self.train_pairs), "train_data_sha256": self._data_digest()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        from .checkpoints import CheckpointError

        if state.get("train_data_sha256") != self._data_digest():
            raise CheckpointError(f"resume_from: the checkpoint was trained on {state.get('train_pairs')} other preference pairs (rows, "
                                  f"labels or tie/invalid-row handling differ) than this train_dataset's {len(self.train_pairs)}; resuming would "
                                  "not continue the same run")

    def _data_digest(self) -> str:
        p = self.train_pairs
        blob = json.dumps([p.rows, p.first_preferred, p.labels], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def save_checkpoint_extras(self, directory: str) -> None:
        if self.ema is not None:
            self.ema.save(directory)

    def load_checkpoint_extras(self, directory: str) -> None:
        if self.ema is not None:
            self.ema.load(directory)

    def card_reward_name(self) -> str:
        return "human preferences"

    def card_objective(self) -> str:
        info = getattr(self.train_dataset, "info", None)
        name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
        where = f"the dataset `{name}`" if name else "a preference dataset"
        return f"to follow the preference pairs of {where} ({len(self.train_pairs)} pairs)"

    def card_prompt_examples(self) -> list[str]:
        return list(self.card_prompts) or self.train_pairs.captions(4)


__all__ = ["DiffusionDPOTrainer", "METHODS", "PairInputs", "lr_factor"]
