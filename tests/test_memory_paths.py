"""The memory options change where activations live, never the maths: parameter gradients with and without each option
agree to float32 rounding (1e-6 of the gradient's norm), for every Nabla-GFlowNet loss configuration and the other methods."""

import pytest
import torch

from trl_gfn import (DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, DRaFTConfig, DRaFTTrainer, NablaGFlowNetConfig, NablaGFlowNetTrainer,
                     ReFLConfig, ReFLTrainer, TransitionBatch)
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion

PROMPTS = ["a red cat", "a blue dog"]
K = 5
OFF = dict(gradient_checkpointing=False, vae_gradient_checkpointing=False)
OPTIONS = {"unet": dict(gradient_checkpointing=True), "vae": dict(vae_gradient_checkpointing=True),
           "both": dict(gradient_checkpointing=True, vae_gradient_checkpointing=True)}
# The shipped defaults (variance weighting, reference guess, pathwise reverse also on the last transition, flow head
# detached in the forward term), the paper's loss (NablaGFlowNetConfig.paper()), and each option changed on its own
NABLA_CASES = {"default": {}, "paper": dict(paper=True), "jacobian_free": dict(jacobian_free_reward_gradient=True),
               "policy_guess": dict(flow_guess_model="policy"), "score_reverse": dict(reverse_loss_type="score"),
               "reference_reverse": dict(reverse_loss_type="reference"),
               "unweighted": dict(transition_loss_weighting="none"), "head_on_forward": dict(train_flow_head_on_forward_loss=True),
               "strength": dict(pretrained_strength=0.5), "paper_jacobian_free": dict(paper=True, jacobian_free_reward_gradient=True)}
STEPS = {"interior": [1, 1], "last": [K - 1, K - 1], "mixed": [2, K - 1]}  # a batch of one interior and one last transition


def _trainer(tmp_path, trainer_class, config_class, **overrides):
    reset_accelerate_state()
    paper = overrides.pop("paper", False)
    kwargs = dict(sample_num_steps=K, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path),
                  save_freq=0, log_image_freq=0, sample_guidance_scale=3.0, **overrides)
    if config_class.requires_transition_density:  # the trainers that replay transitions: 0.4 of them
        kwargs.setdefault("train_timestep_fraction", 0.4)
    config = config_class.paper(**kwargs) if paper else config_class(**kwargs)
    trainer = trainer_class(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion(seed=0)), prompt_function=PROMPTS)
    torch.manual_seed(3)  # move the policy (and the flow head) off their initialisation: every term is non-trivial
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.normal_(p, std=0.02)
    if getattr(trainer, "flow_head", None) is not None:
        torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.05)
    return trainer


def _grads(trainer):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in trainer.trainable_parameters()])


def _nabla_grads(tmp_path, step, **overrides):
    trainer = _trainer(tmp_path, NablaGFlowNetTrainer, NablaGFlowNetConfig, flow_block_out_channels=[8, 16], flow_attention_head_dim=4,
                       reward_scale=30.0, unet_reg_scale=1.0, **overrides)
    samples = trainer.sample_epoch(0)
    loss, terms = trainer.compute_loss(TransitionBatch.from_trajectories(samples, torch.tensor(STEPS[step])))
    loss.backward()
    return _grads(trainer), terms, trainer


def _close(grads, ref):
    assert ref.norm() > 0 and torch.isfinite(grads).all()
    assert (grads - ref).norm() <= 1e-6 * ref.norm(), ((grads - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("case", list(NABLA_CASES))
@pytest.mark.parametrize("step", list(STEPS))
def test_nabla_gradients_do_not_depend_on_the_memory_options(tmp_path, case, step):
    """Reference: the order without any checkpointing (memory_efficient_order=False: graphs coexist as before). Every
    option and the memory ordering give the same loss terms and the same LoRA and flow-head gradients (1e-6)."""
    ref, ref_terms, _ = _nabla_grads(tmp_path / "ref", step, memory_efficient_order=False, **OFF, **NABLA_CASES[case])
    for name, opts in {"ordered": dict(memory_efficient_order=True), **OPTIONS}.items():
        grads, terms, trainer = _nabla_grads(tmp_path / name, step, **{**OFF, **opts}, **NABLA_CASES[case])
        _close(grads, ref)
        for key in ("loss_forward", "loss_reverse", "loss_terminal", "loss_reg"):
            torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-6, atol=0, msg=f"{name}: {key}")
        if trainer.flow_head is not None:  # the flow head's own gradient is in the comparison too
            assert trainer.flow_head.unet.conv_out.weight.grad.abs().max() > 0


def test_checkpointed_calls_recompute_and_keep_only_inputs(tmp_path):
    """With the memory ordering the UNet calls of the reward-gradient passes are recomputed in their VJPs, the flow head in
    the backward pass."""
    counts = {}
    for name, opts in {"plain": dict(memory_efficient_order=False), "ordered": dict(memory_efficient_order=True)}.items():
        trainer = _trainer(tmp_path / name, NablaGFlowNetTrainer, NablaGFlowNetConfig, flow_block_out_channels=[8, 16],
                           flow_attention_head_dim=4, reward_scale=30.0, **opts)
        samples = trainer.sample_epoch(0)
        calls = []
        handles = [trainer.pipeline.unet.register_forward_pre_hook(lambda *a: calls.append("unet")),
                   trainer.flow_head.register_forward_pre_hook(lambda *a: calls.append("flow_head"))]
        loss, _ = trainer.compute_loss(TransitionBatch.from_trajectories(samples, torch.full((2,), 1)))
        loss.backward()
        for handle in handles:
            handle.remove()
        counts[name] = (calls.count("unet"), calls.count("flow_head"))
    # plain: guess at x_{k-1}, reference and policy at x_k, one flow-head call; ordered: the first two UNet calls are
    # recomputed in their VJPs and the flow head in the backward pass
    assert counts == {"plain": (3, 1), "ordered": (5, 2)}


def _backprop_grads(tmp_path, trainer_class, config_class, **overrides):
    trainer = _trainer(tmp_path, trainer_class, config_class, **overrides)
    out = trainer.generate_with_grad(list(PROMPTS), [{}, {}], [0, 1], 0)
    rewards, _ = trainer.compute_rewards(out.images, out.prompts, out.prompt_metadata, need_grad=True)
    (-rewards.mean()).backward()
    return _grads(trainer)


@pytest.mark.parametrize("method", ["draft_all", "draft_lv", "refl"])
def test_reward_backprop_gradients_do_not_depend_on_checkpointing(tmp_path, method):
    trainer_class, config_class, opts = {"draft_all": (DRaFTTrainer, DRaFTConfig, dict(draft_k=0)),
                                         "draft_lv": (DRaFTTrainer, DRaFTConfig, dict(draft_lv_copies=2)),
                                         "refl": (ReFLTrainer, ReFLConfig, dict(refl_timestep_range=[0, 999]))}[method]
    ref = _backprop_grads(tmp_path / "ref", trainer_class, config_class, **OFF, **opts)
    for name, extra in OPTIONS.items():
        _close(_backprop_grads(tmp_path / name, trainer_class, config_class, **{**OFF, **extra}, **opts), ref)


def test_ddpo_gradients_do_not_depend_on_checkpointing(tmp_path):
    results = []
    for opts in (OFF, OPTIONS["unet"]):
        trainer = _trainer(tmp_path / str(len(results)), DDPOTrainer, DDPOConfig, train_clip_range=0.5, **opts)
        samples = trainer.sample_epoch(0)
        samples.extras["advantages"] = torch.tensor([1.0, -0.5])
        loss, _ = trainer.compute_loss(TransitionBatch.from_trajectories(samples, torch.full((2,), 2)))
        loss.backward()
        results.append(_grads(trainer))
    _close(results[1], results[0])


def test_vae_checkpointing_follows_the_config(tmp_path):
    with pytest.warns(UserWarning, match="vae_gradient_checkpointing has no effect: DDPO never differentiates through the VAE"):
        DDPOConfig(vae_gradient_checkpointing=True, logdir=str(tmp_path))
    assert NablaGFlowNetConfig(logdir=str(tmp_path)).vae_gradient_checkpointing  # on by default for reward-gradient trainers
    assert DRaFTConfig(logdir=str(tmp_path)).vae_gradient_checkpointing and ReFLConfig(logdir=str(tmp_path)).vae_gradient_checkpointing
    pipeline = DiffusionPipelineForRL(tiny_stable_diffusion(seed=0))
    pipeline.vae.enable_gradient_checkpointing()  # set on the pipeline by hand: the trainer's config decides
    trainer = DRaFTTrainer(DRaFTConfig(vae_gradient_checkpointing=False, logdir=str(tmp_path), save_freq=0, log_image_freq=0),
                           BrightnessReward(), pipeline, prompt_function=PROMPTS)
    assert not trainer.pipeline.vae.decoder.gradient_checkpointing
    trainer = _trainer(tmp_path / "on", DRaFTTrainer, DRaFTConfig)
    assert trainer.pipeline.vae.decoder.gradient_checkpointing and trainer.modules.checkpointed == frozenset({"unet"})
