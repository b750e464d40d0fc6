"""SPIN-Diffusion: self-play fine-tuning from the preferred images only (Yuan et al., NeurIPS 2024, arXiv:2402.10210).

Iteration k plays the model against its previous iterate θ_k: for every real (preferred) image x of the data and its caption,
θ_k samples ``spin_samples_per_prompt`` fakes x'; the policy is trained with a DPO-style logistic loss in which the real image
plays the winner, the fake the loser and θ_k the reference,

    u = −(β/2)·[(err_θ(x) − err_θk(x)) − (err_θ(x') − err_θk(x'))],   loss −log σ(u),

with the errors of Diffusion-DPO (one shared timestep and noise per (real, fake) pair): the per-step approximation of
SPIN-Diffusion's objective, which needs no stored intermediate images. After ``spin_epochs_per_iteration`` epochs the reference
moves forward (θ_{k+1} = the current LoRA) and the fakes are resampled with it.

The reference is a second, frozen LoRA adapter in the same UNet (``spin_reference``; :meth:`DiffusionPipelineForRL.add_frozen_adapter`):
moving it forward copies the trained adapter's weights into it, and the reference pass switches to it
(:meth:`DiffusionPipelineForRL.adapter_mode`) — LoRA-sized, no UNet copy. Checkpoints hold it (``spin_reference_lora.safetensors``)
and the iteration; the fakes are drawn from per-(iteration, row, sample) seeds, so a resumed run regenerates the same ones.
Cost per (real, fake) pair: Diffusion-DPO's (2 forwards + backwards, 2 reference forwards), plus per iteration
``sample_num_steps`` guided sampling steps per fake.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from ..configs.spin import SPINDiffusionConfig
from ..data.preference import PairBatch
from ..data.self_play import SelfPlayBatch, SelfPlayPairs
from .base import sample_seed
from .diffusion_dpo import Denoised, DiffusionDPOTrainer, PairInputs

REFERENCE_ADAPTER = "spin_reference"
REFERENCE_FILE = "spin_reference_lora.safetensors"
_CITATION = """@inproceedings{yuan2024selfplay,
  title     = {Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation},
  author    = {Huizhuo Yuan and Zixiang Chen and Kaixuan Ji and Quanquan Gu},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  eprint    = {2402.10210}
}"""


class SPINDiffusionTrainer(DiffusionDPOTrainer):
    """Self-play fine-tuning (SPIN-Diffusion) of a LoRA on the preferred images of a preference dataset.

    Usage::

        config = SPINDiffusionConfig(spin_num_iterations=2, spin_epochs_per_iteration=1, num_epochs=2)
        trainer = SPINDiffusionTrainer(config, pipeline, train_dataset, eval_dataset)
        trainer.train()

    ``train_dataset`` is a preference dataset (Pick-a-Pic layout); only the preferred image of each non-tie pair is used.
    ``eval_dataset`` (optional) is evaluated as Diffusion-DPO's (preferred vs other image) against the current reference θ_k.
    Logged in addition: ``spin/iteration``, and per iteration ``spin/fake_seconds``.
    """

    config_class = SPINDiffusionConfig

    def __init__(self, config: SPINDiffusionConfig, pipeline, train_dataset, eval_dataset=None) -> None:
        self.fakes_iteration: int | None = None
        super().__init__(config, pipeline, train_dataset, eval_dataset)
        self.method_name, self.method_tag = "SPIN-Diffusion", "spin-diffusion"
        self.paper = "Yuan, Chen, Ji, Gu, *Self-Play Fine-Tuning of Diffusion Models for Text-to-Image Generation*, NeurIPS 2024, arXiv:2402.10210"
        self.citation = _CITATION + "\n\n" + self.citation

    @property
    def card_fields(self) -> list[str]:  # type: ignore[override]
        return super().card_fields + ["spin_num_iterations", "spin_epochs_per_iteration", "spin_samples_per_prompt", "sample_num_steps",
                                      "sample_guidance_scale"]

    def setup_components(self) -> None:
        """The preference trainer's checks, then the self-play view of the pairs and the frozen reference adapter."""
        super().setup_components()
        self.real_pairs = self.train_pairs
        self.train_pairs = SelfPlayPairs(self.real_pairs, self.config.spin_samples_per_prompt)
        self.pipeline.add_frozen_adapter(REFERENCE_ADAPTER)

    # ------------------------------------------------------------------ iterations
    def iteration(self, epoch: int) -> int:
        """The self-play iteration epoch ``epoch`` belongs to."""
        return epoch // self.config.spin_epochs_per_iteration

    def advance_reference(self) -> None:
        """θ_{k+1} := the current LoRA: copy the trained adapter into the reference adapter (no UNet copy)."""
        self.pipeline.copy_adapter(self.pipeline.adapter_name, REFERENCE_ADAPTER)

    @torch.no_grad()
    def sample_fakes(self, iteration: int) -> torch.Tensor:
        """Clean latents (n·m, C, h, w) of the reference's samples for every real image's caption, m per image; fake j of kept pair
        i is drawn from the seed (seed, iteration, dataset row, j), whatever the batch size or process count."""
        c, acc = self.config, self.accelerator
        pairs = self.train_pairs
        captions = [cap for cap in pairs.real_captions() for _ in range(pairs.m)]
        schedule = self.pipeline.make_schedule(c.resolve_sampler(self.pipeline.family.default_sampler), c.sample_num_steps, c.sample_eta,
                                               c.sample_noise_level)
        mine = list(range(acc.process_index, len(captions), acc.num_processes))
        out: dict[int, torch.Tensor] = {}
        with self.pipeline.adapter_mode(REFERENCE_ADAPTER):
            for start in range(0, len(mine), c.sample_batch_size):
                idx = mine[start:start + c.sample_batch_size]
                gens = [torch.Generator().manual_seed(sample_seed(c.seed, iteration, pairs.rows[i], 17)) for i in idx]
                traj = self.pipeline.sample([captions[i] for i in idx], schedule, guidance_scale=c.sample_guidance_scale,
                                            negative_prompt=None, generators=gens, decode=False)
                for i, z in zip(idx, traj.latents[:, -1].float().cpu()):
                    out[i] = z
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            out = {i: z for part in gather_object([out]) for i, z in part.items()}
        return torch.stack([out[i] for i in range(len(captions))])

    def step(self, epoch: int, global_step: int) -> int:
        """At the start of an iteration move the reference forward and resample the fakes (also after a resume inside an
        iteration or inside an epoch, from the restored reference), then the preference trainer's epoch."""
        import time

        k = self.iteration(epoch)
        if epoch % self.config.spin_epochs_per_iteration == 0 and self.state.epoch_updates == 0:  # not when resumed inside it
            self.advance_reference()
            self.fakes_iteration = None
        if self.fakes_iteration != k:
            start = time.time()
            self.train_pairs.fakes = self.sample_fakes(k)
            self.fakes_iteration = k
            self.log({"spin/fake_seconds": time.time() - start}, step=global_step)
        self.log({"spin/iteration": float(k)}, step=global_step)
        return super().step(epoch, global_step)

    # ------------------------------------------------------------------ pairs and reference
    def encode_pair_latents(self, batch: PairBatch, generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Real images: a VAE posterior sample each; fakes: the sampled latents (self-play batches). Other batches (the eval
        pairs): both images through the VAE, as in Diffusion-DPO."""
        if not isinstance(batch, SelfPlayBatch):
            return super().encode_pair_latents(batch, generators)
        real = self.pipeline.encode_images(batch.winners.to(self.accelerator.device), list(generators)).float()
        return real, batch.fake_latents.to(device=real.device, dtype=torch.float32)

    @torch.no_grad()
    def reference_errors(self, inputs: PairInputs) -> Denoised:
        """The previous iterate θ_k: the UNet with the frozen reference adapter, without gradient."""
        with self.pipeline.adapter_mode(REFERENCE_ADAPTER):
            return self.denoise(self.pipeline.denoiser, inputs)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "spin_samples_per_prompt": self.config.spin_samples_per_prompt}

    def save_checkpoint_extras(self, directory: str) -> None:
        """The reference adapter (the previous iterate's LoRA) as ``spin_reference_lora.safetensors``."""
        from safetensors.torch import save_file

        super().save_checkpoint_extras(directory)
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in self.pipeline.denoiser.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
        save_file(tensors, os.path.join(directory, REFERENCE_FILE))

    def load_checkpoint_extras(self, directory: str) -> None:
        from ..weights_io import read_safetensors

        super().load_checkpoint_extras(directory)
        path = os.path.join(directory, REFERENCE_FILE)
        state = read_safetensors(path, what="SPIN reference LoRA")
        params = {n: p for n, p in self.pipeline.denoiser.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
        if sorted(state) != sorted(params) or any(state[n].shape != params[n].shape for n in params):
            raise ValueError(f"{path}: its tensors do not match this run's reference adapter (other lora_rank or lora_target_modules?)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])
        self.fakes_iteration = None  # resampled from the restored reference

    def card_objective(self) -> str:
        return (f"by self-play against its previous iterate on the preferred images of {len(self.real_pairs)} preference pairs "
                f"({self.config.spin_num_iterations} iterations)")


__all__ = ["REFERENCE_ADAPTER", "SPINDiffusionTrainer"]
