"""train_pack_timesteps: every selected transition of a micro-batch in one loss call gives the gradient of the unpacked
micro-batches accumulated (float32 rounding), the same number of optimizer updates and the same logged terms, from
fewer model calls."""

import pytest
import torch

from trl_gfn import DDPOConfig, DDPOTrainer, DiffusionPipelineForRL, NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.testing import BrightnessReward, reset_accelerate_state, tiny_stable_diffusion

PROMPTS = ["a red cat", "a blue dog"]
K = 5
NABLA_CASES = {
    "default": {},
    "paper": dict(paper=True),
    "score_reverse": dict(reverse_loss_type="score"),  # the reverse term on interior rows only
    "reference_reverse": dict(reverse_loss_type="reference"),
    "subsampled": dict(train_timestep_fraction=0.4),
    "no_flow_head": dict(use_flow_head=False),
    "importance": dict(importance_weighting="linearised"),  # weights normalised per step index of the batch
    "trajectory_balance": dict(trajectory_balance_scale=1.0),
    "reference_trajectories": dict(flow_head_trajectories="reference_resampled"),  # the flow head's terms on paired reference rows
    "reference_forward": dict(flow_head_trajectories="reference_resampled", train_policy_on_reference_trajectories=True),
    "reference_location": dict(flow_head_trajectories="reference_resampled", train_policy_on_reference_trajectories=True,
                               reference_forward_target="location"),
}


def _run(tmp_path, trainer_class, config_class, pack: bool, **overrides):
    """One epoch (one optimizer update over 2 micro-batches) on fixed samples; returns the gradient at the update, the
    logged terms of that update, the number of policy-UNet forwards, the global step, the number of trained transitions
    per trajectory and the rows through the flow head and the VAE decoder."""
    reset_accelerate_state()
    paper = overrides.pop("paper", False)
    kwargs = dict(sample_num_steps=K, sample_batch_size=2, sample_num_batches_per_epoch=2, train_batch_size=2,
                  train_gradient_accumulation_steps=2, train_max_grad_norm=0.0, logdir=str(tmp_path), save_freq=0, log_image_freq=0,
                  sample_guidance_scale=3.0, train_pack_timesteps=pack, **overrides)
    config = config_class.paper(**kwargs) if paper else config_class(**kwargs)
    trainer = trainer_class(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion(seed=0)), prompt_function=PROMPTS)
    torch.manual_seed(3)  # move the policy and the flow head well off their initialisation: every term is non-trivial
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    if getattr(trainer, "flow_head", None) is not None:
        torch.nn.init.normal_(trainer.flow_head.unet.conv_out.weight, std=0.05)
    samples = trainer.sample_epoch(0)
    grads, logged, calls = [], [], []
    step = trainer.optimizer.step

    def recording_step(*args, **kw):
        grads.append(torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in trainer.trainable_parameters()]))
        return step(*args, **kw)

    trainer.optimizer.step = recording_step
    trainer.log = lambda logs, step=None: logged.append(dict(logs))
    # policy-UNet calls of the loss (with grad: not the trajectory-balance advantages' reference forwards)
    handles = [trainer.pipeline.unet.register_forward_pre_hook(lambda *a: calls.append(1) if torch.is_grad_enabled() else None)]
    rows = {"flow_head": 0, "decoder": 0}  # rows through the flow head and the VAE decoder in training

    def counter(name):
        def hook(module, inputs):
            rows[name] += inputs[0].shape[0]
        return hook

    handles.append(trainer.pipeline.vae.decoder.register_forward_pre_hook(counter("decoder")))
    if getattr(trainer, "flow_head", None) is not None:
        handles.append(trainer.flow_head.register_forward_pre_hook(counter("flow_head")))
    global_step = trainer.train_on_samples(samples, 0, 0)
    for handle in handles:
        handle.remove()
    updates = [entry for entry in logged if "loss" in entry]
    return grads, updates, len(calls), global_step, trainer.config.num_train_timesteps, rows


def _compare(tmp_path, trainer_class, config_class, keys, **overrides):
    ref_grads, ref_logs, ref_calls, ref_step, n, _ = _run(tmp_path / "unpacked", trainer_class, config_class, False, **overrides)
    grads, logs, calls, step, _, _ = _run(tmp_path / "packed", trainer_class, config_class, True, **overrides)
    assert step == ref_step == 1 and len(grads) == len(ref_grads) == 1
    ref, got = ref_grads[0], grads[0]
    assert ref.norm() > 0 and torch.isfinite(got).all()
    # float32 rounding of ε̂_θ and ε̂_ref depends on the batch size, and their difference (the residual) is small: 1e-5 relative
    # on the unweighted loss, dominated by the σ ≈ 0.02 step; a wrong normalisation of any term is off by O(1/n)
    assert (got - ref).norm() <= 3e-5 * ref.norm(), ((got - ref).norm() / ref.norm()).item()
    for key in keys:
        torch.testing.assert_close(torch.tensor(logs[0][key]), torch.tensor(ref_logs[0][key]), rtol=1e-5, atol=1e-12, msg=key)
    # about n times fewer (n times larger) policy-UNet calls: the same calls per micro-batch as the costliest transition
    assert n > 1 and calls * (n - 1) <= ref_calls, (calls, ref_calls, n)


@pytest.mark.parametrize("case", list(NABLA_CASES))
def test_packed_nabla_gradient_equals_the_accumulated_one(tmp_path, case):
    overrides = dict(NABLA_CASES[case])
    overrides.setdefault("train_timestep_fraction", 1.0)
    _compare(tmp_path, NablaGFlowNetTrainer, NablaGFlowNetConfig, ("loss", "loss_forward", "loss_reverse", "loss_terminal", "loss_reg"),
             flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=30.0, unet_reg_scale=1.0, **overrides)


@pytest.mark.parametrize("case", ["default", "reference_trajectories"])
def test_packed_nabla_evaluates_each_shared_state_once(tmp_path, case):
    """Packed, a state that is one transition's x_{k-1} and the next one's x_k goes through the flow head once and (for
    the reference's guess) is decoded once: B(K + 1) rows per micro-batch of B trajectories, against 2BK unpacked."""
    kw = dict(NABLA_CASES[case], train_timestep_fraction=1.0, flow_block_out_channels=[8, 16], flow_attention_head_dim=4, reward_scale=30.0,
              memory_efficient_order=False, vae_gradient_checkpointing=False)  # no recomputing forward calls to count
    micro_batches, B = 2, 2
    *_, unpacked = _run(tmp_path / "unpacked", NablaGFlowNetTrainer, NablaGFlowNetConfig, False, **kw)
    *_, packed = _run(tmp_path / "packed", NablaGFlowNetTrainer, NablaGFlowNetConfig, True, **kw)
    # reference_trajectories: also g_φ at the policy's x_{k-1} for the forward target (no grad), B rows per transition
    extra = B * K if case == "reference_trajectories" else 0
    assert unpacked["flow_head"] == micro_batches * (2 * B * K + extra)
    assert packed["flow_head"] == micro_batches * (B * (K + 1) + extra)
    if case == "default":  # the guess at x_{k-1} for the forward target, at x_k for the reverse term
        assert unpacked["decoder"] == micro_batches * 2 * B * K
        assert packed["decoder"] == micro_batches * B * (K + 1)


def test_next_and_previous_state_rows(tmp_path):
    """next_state_rows pairs a row with the row of the same trajectory one step on, whose x_k is this row's x_{k-1}
    (−1 for a trajectory's last step, and without trajectory numbers); previous_state_rows is its inverse."""
    reset_accelerate_state()
    config = DDPOConfig(sample_num_steps=K, sample_batch_size=3, sample_num_batches_per_epoch=1, train_batch_size=3, logdir=str(tmp_path),
                        save_freq=0, log_image_freq=0)
    trainer = DDPOTrainer(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion(seed=0)), prompt_function=PROMPTS)
    samples = trainer.sample_epoch(0)
    rows, steps = torch.tensor([2, 0, 2, 1, 0, 2, 1]), torch.tensor([1, 3, 2, 4, 4, 4, 0])
    batch = TransitionBatch.from_trajectories(samples, steps, rows=rows)
    nxt, prev = batch.next_state_rows(), batch.previous_state_rows()
    assert nxt.tolist() == [2, 4, -1, -1, -1, -1, -1]  # trajectory 2: 1 → 2 (not 2 → 4: step 3 is absent); trajectory 0: 3 → 4
    assert prev.tolist() == [-1, -1, 0, -1, 1, -1, -1]
    for r, s in enumerate(nxt.tolist()):
        if s >= 0:
            assert torch.equal(batch.next_latents[r], batch.latents[s])
    whole = TransitionBatch.from_trajectories(samples, torch.tensor([0, 1, 2]))
    assert whole.trajectory is None and whole.next_state_rows().tolist() == [-1, -1, -1]


def test_packed_ddpo_gradient_equals_the_accumulated_one(tmp_path):
    _compare(tmp_path, DDPOTrainer, DDPOConfig, ("loss", "approx_kl"), train_timestep_fraction=0.6)


def test_packing_keeps_the_accumulation_count():
    """Unpacked, an update accumulates one backward pass per trained transition index; packed, one per micro-batch."""
    reset_accelerate_state()
    config = dict(sample_num_steps=K, sample_batch_size=2, train_batch_size=2, train_timestep_fraction=1.0)
    unpacked, packed = NablaGFlowNetConfig(**config), NablaGFlowNetConfig(**config, train_pack_timesteps=True)
    assert unpacked.num_train_timesteps == packed.num_train_timesteps == K
    assert NablaGFlowNetTrainer.backward_passes_per_micro_batch.fget(type("T", (), {"config": unpacked})()) == K
    assert NablaGFlowNetTrainer.backward_passes_per_micro_batch.fget(type("T", (), {"config": packed})()) == 1


@pytest.mark.parametrize("field,value", [("train_pack_timesteps", True), ("train_timestep_fraction", 0.5), ("train_num_inner_epochs", 2)])
def test_gradient_through_sampler_configs_refuse_the_transition_fields(field, value):
    """DRaFT, AlignProp and ReFL differentiate through the sampler: a transition-replay field set there is an error, not ignored."""
    from trl_gfn import AlignPropConfig, DRaFTConfig, ReFLConfig

    for config_class in (DRaFTConfig, AlignPropConfig, ReFLConfig):
        with pytest.raises(ValueError, match=field):
            config_class(**{field: value})
    assert getattr(NablaGFlowNetConfig(**{field: value}), field) == value
    assert getattr(DDPOConfig(**{field: value}), field) == value


def test_transition_batch_rows_gather_like_a_selection(tmp_path):
    """from_trajectories(traj, steps, rows) — rows may repeat — equals gathering from traj.select(rows), field by field."""
    reset_accelerate_state()
    config = DDPOConfig(sample_num_steps=K, sample_batch_size=3, sample_num_batches_per_epoch=1, train_batch_size=3, logdir=str(tmp_path),
                        save_freq=0, log_image_freq=0)
    trainer = DDPOTrainer(config, BrightnessReward(), DiffusionPipelineForRL(tiny_stable_diffusion(seed=0)), prompt_function=PROMPTS)
    samples = trainer.prepare_training_samples(trainer.sample_epoch(0))
    assert samples.extras  # the advantages travel with their rows
    rows, steps = torch.tensor([2, 0, 2, 1, 0]), torch.tensor([4, 1, 0, 3, 4])
    got = TransitionBatch.from_trajectories(samples, steps, rows=rows)
    want = TransitionBatch.from_trajectories(samples.select(rows), steps)
    for name in ("latents", "next_latents", "step_index", "epsilons", "next_epsilons", "prompt_embeds", "negative_prompt_embeds"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.prompts == want.prompts and got.prompt_metadata == want.prompt_metadata
    assert got.extras.keys() == want.extras.keys() and all(torch.equal(got.extras[k], want.extras[k]) for k in got.extras)
    assert not got.next_epsilons[steps == K - 1].any()
