"""The residual ∇-DB loss: every term against an independent autograd computation, terms that vanish where the
theory says, which term trains which parameters, and the paper's loss as an option."""

import copy
import math

import pytest
import torch

from trl_gfn import NablaGFlowNetConfig, NablaGFlowNetTrainer, TransitionBatch
from trl_gfn.diffusion import predict_x0, score_residual, step_mean
from trl_gfn.testing import BrightnessReward, PromptAwareReward

PROMPTS = ["a red cat", "a blue dog"]
K = 6


def make_trainer(tmp_path, pipeline, reward=None, paper=False, **overrides):
    kwargs = dict(sample_num_steps=K, sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2, logdir=str(tmp_path),
                  flow_block_out_channels=[8, 16], flow_attention_head_dim=4, save_freq=0, log_image_freq=0, reward_scale=0.0,
                  unet_reg_scale=1.0, sample_guidance_scale=3.0, train_timestep_fraction=0.34)
    kwargs.update(overrides)
    config = NablaGFlowNetConfig.paper(**kwargs) if paper else NablaGFlowNetConfig(**kwargs)
    return NablaGFlowNetTrainer(config, reward or BrightnessReward(), pipeline, prompt_function=PROMPTS)


def batch_at(samples, step):
    return TransitionBatch.from_trajectories(samples, torch.full((len(samples),), step))


def randomise(trainer, flow=True, lora=True, seed=3, lora_std=0.02):
    """Move the flow head off zero and the policy off the reference, so that every term is non-trivial."""
    torch.manual_seed(seed)
    if flow:
        conv = trainer.flow_head.unet.conv_out
        torch.nn.init.normal_(conv.weight, std=0.05)
        torch.nn.init.normal_(conv.bias, std=0.05)
    if lora:
        for p in trainer.pipeline.lora_parameters():
            torch.nn.init.normal_(p, std=lora_std)


# ----------------------------------------------------------------------- an independent computation of every term
class Naive:
    """Every quantity of DESIGN §2 in float64, by plain autograd on log-densities and rewards, with float64 copies of the
    models and its own guided noise prediction and decoding: no VJP splits, no analytic parts, no shared code path."""

    def __init__(self, trainer, batch):
        self.tr, self.b = trainer, batch
        self.pipe, self.sched, self.c = trainer.pipeline, trainer.schedule, trainer.config
        self.unet = copy.deepcopy(self.pipe.unet).double()
        self.vae = copy.deepcopy(self.pipe.vae).double()
        self.head = copy.deepcopy(trainer.flow_head).double() if self.c.use_flow_head else None
        self.emb, self.neg = batch.prompt_embeds.double(), batch.negative_prompt_embeds.double()

    def eps(self, x, pos, reference):
        n = len(x)
        t = self.sched.timesteps[pos].repeat(2 * n)
        if reference:
            self.unet.disable_adapters()
        try:
            out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self.neg, self.emb])).sample
        finally:
            self.unet.enable_adapters()
        uncond, cond = out.chunk(2)
        return uncond + self.c.sample_guidance_scale * (cond - uncond)

    def mean(self, x, pos, reference):
        s = self.sched
        return s.coef_x[pos].double() * x + s.coef_eps[pos].double() * self.eps(x, pos, reference)

    def reward(self, lat):
        images = (self.vae.decode(lat / self.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return self.tr.reward_fn.score(images, self.b.prompts, [{}] * len(lat))

    def guess(self, y, pos):
        """β γ ∇_y r(decode(x̂_0(y))) at a state y of sampling position pos (x̂_0 = y at pos = K)."""
        y = y.detach().double().clone().requires_grad_(True)
        a = self.sched.alphas_cumprod[pos].double()
        with torch.enable_grad():
            if pos == self.sched.num_steps:
                x0 = y
            else:
                x0 = (y - (1 - a).sqrt() * self.eps(y, pos, self.c.flow_guess_model == "reference")) / a.sqrt()
            (g,) = torch.autograd.grad(self.reward(x0).sum(), y)
        if self.c.reward_gradient_scaling == "saturating":  # posterior smoothing of a log-reward of curvature 1/β_c
            gamma = a / (a + self.c.reward_scale / self.c.reward_gradient_saturation_reward_scale * (1 - a))
        else:
            gamma = a if self.c.reward_gradient_scaling == "squared" else a.sqrt()
        return self.c.reward_scale * gamma * g

    def g(self, y, pos):
        y = y.double()
        if self.head is None or pos == self.sched.num_steps:
            return torch.zeros_like(y)
        emb = self.emb if self.head.config.condition_on_prompt else torch.zeros_like(self.emb)
        with torch.no_grad():
            return self.head.unet(y, self.sched.timesteps[pos].repeat(len(y)), emb).sample

    def terms(self, k):
        """(forward, reverse) per-element losses of the transition leaving sampling position k (reverse None if not applied)."""
        c, s = self.c, self.sched
        x, xn = self.b.latents.detach().double(), self.b.next_latents.detach().double()
        std = s.std[k].double()
        w = std**2 if c.transition_loss_weighting == "variance" else torch.tensor(1.0, dtype=torch.float64)
        strength = c.pretrained_strength

        def logp(y_next, mean):
            return (-0.5 * (y_next - mean) ** 2 / std**2).sum()

        def score_next(reference):
            y = xn.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(logp(y, self.mean(x, k, reference).detach()), y)
            return g

        def score_cur(reference):
            y = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(logp(xn, self.mean(y, k, reference)), y)
            return g

        residual = score_next(False) - strength * score_next(True)
        flow_next = self.guess(xn, k + 1) + self.g(xn, k + 1)
        forward = w * (residual - flow_next) ** 2
        if c.reverse_loss_type == "score" and k == s.num_steps - 1:
            return forward, None
        if c.reverse_loss_type == "reference":  # ∇log F̃_k(x_k) = J_refᵀ ∇log F̃_{k-1}(x_{k-1}): the reference step's backup
            y = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (backup,) = torch.autograd.grad((self.mean(y, k, True) * flow_next.detach()).sum(), y)
            return forward, w * (self.guess(x, k) + self.g(x, k) - backup) ** 2
        reverse = score_cur(False) - strength * score_cur(True) + self.guess(x, k) + self.g(x, k)
        if c.reverse_loss_type == "pathwise":
            rho = (flow_next - residual).detach()
            y = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (jt_rho,) = torch.autograd.grad((self.mean(y, k, False) * rho).sum(), y)
            reverse = reverse - jt_rho
        return forward, w * reverse**2


CASES = {
    "default": dict(),
    "paper": dict(paper=True),
    "sqrt_half_strength": dict(reward_gradient_scaling="sqrt", pretrained_strength=0.5),
    "saturating_low_beta": dict(reward_gradient_scaling="saturating", reward_gradient_saturation_reward_scale=200.0),
    "policy_guess_score_reverse": dict(flow_guess_model="policy", reverse_loss_type="score"),
    "unweighted_pathwise": dict(transition_loss_weighting="none"),
    "reference_backup": dict(reverse_loss_type="reference"),
    "reference_backup_policy_guess": dict(reverse_loss_type="reference", flow_guess_model="policy"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("step", [1, K - 1])
def test_every_term_equals_an_independent_autograd_computation(tmp_path, tiny_pipeline, case, step):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=20.0, **CASES[case])
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, step)
    _, terms = trainer.compute_loss(batch)
    forward, reverse = Naive(trainer, batch).terms(step)
    torch.testing.assert_close(terms["loss_forward"].double(), forward.mean(), rtol=1e-4, atol=0)
    if reverse is None:
        assert terms["loss_reverse"].item() == 0.0
    else:
        torch.testing.assert_close(terms["loss_reverse"].double(), reverse.mean(), rtol=1e-4, atol=0)
        assert reverse.mean() > 0
    assert forward.mean() > 0


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize("step", [2, K - 1])
def test_all_terms_vanish_at_initialisation_with_zero_reward_scale(tmp_path, tiny_pipeline, step, paper):
    trainer = make_trainer(tmp_path, tiny_pipeline, paper=paper)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, step)
    _, terms = trainer.compute_loss(batch)
    assert terms["loss_forward"].item() == 0.0  # policy == reference, g == 0, β == 0
    assert terms["loss_reverse"].item() == 0.0
    assert terms["loss_terminal"].item() == 0.0
    assert terms["loss_reg"].item() < 1e-10  # ε recorded while sampling == ε recomputed now
    randomise(trainer, flow=False)  # the same batch with the policy moved: the loss is not trivially 0
    _, moved = trainer.compute_loss(batch)
    assert moved["loss_forward"].item() > 1e-8 and moved["norm_policy_residual"].item() > 1e-4


@pytest.mark.parametrize("model", ["reference", "policy"])
@pytest.mark.parametrize("step", [1, K - 1])
def test_forward_target_is_beta_gamma_grad_r_of_the_guess_model(tmp_path, tiny_pipeline, step, model):
    beta = 50.0
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=beta, flow_guess_model=model, use_flow_head=False)
    samples = trainer.sample_epoch(0)
    randomise(trainer, flow=False, seed=5)  # policy != reference: the two guess models differ
    batch = batch_at(samples, step)
    _, terms = trainer.compute_loss(batch)
    naive = Naive(trainer, batch)
    guess = naive.guess(batch.next_latents, step + 1)
    torch.testing.assert_close(terms["norm_reward_guess"].double(), guess.flatten(1).norm(dim=1).mean(), rtol=1e-4, atol=0)

    def guess_of(m):
        trainer.config.flow_guess_model = m
        return trainer.reward_guess(batch.next_latents, batch.step_index + 1, batch.prompt_embeds, batch.negative_prompt_embeds,
                                    batch.prompts, [{}, {}])

    other = "policy" if model == "reference" else "reference"
    if step < K - 1:  # x̂_0 of the two models differ ...
        assert not torch.allclose(guess_of(model), guess_of(other), rtol=1e-4, atol=0)
    else:  # ... but at x_0 there is no x̂_0 to predict
        torch.testing.assert_close(guess_of(model), guess_of(other), rtol=0, atol=0)


def test_sqrt_scaling_divides_the_guess_by_sqrt_alpha(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=10.0)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)
    _, t_sq = trainer.compute_loss(batch)
    trainer.config.reward_gradient_scaling = "sqrt"
    _, t_sqrt = trainer.compute_loss(batch)
    a = trainer.schedule.alphas_cumprod[3].float()
    torch.testing.assert_close(t_sqrt["norm_reward_guess"] / t_sq["norm_reward_guess"], 1 / a.sqrt(), rtol=1e-4, atol=0)


def test_saturating_scaling_is_the_squared_guess_at_its_reward_scale_and_grows_below_it(tmp_path, tiny_pipeline):
    """At β = β_c the saturating γ is ᾱ to the last bit (the shipped digits runs at β = 30 are unchanged); at β = β_c/10
    the guess is larger by 1/(ᾱ + 0.1(1 − ᾱ)) at the state's ᾱ."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=10.0)
    batch = batch_at(trainer.sample_epoch(0), 2)

    def guess():
        return trainer.reward_guess(batch.next_latents, batch.step_index + 1, batch.prompt_embeds, batch.negative_prompt_embeds,
                                    batch.prompts, [{}, {}])

    squared = guess()
    trainer.config.reward_gradient_scaling = "saturating"
    trainer.config.reward_gradient_saturation_reward_scale = 10.0
    assert torch.equal(guess(), squared)
    trainer.config.reward_gradient_saturation_reward_scale = 100.0
    a = trainer.schedule.alphas_cumprod[3].float()
    ratio = guess().norm() / squared.norm()
    torch.testing.assert_close(ratio, 1 / (a + 0.1 * (1 - a)), rtol=1e-4, atol=0)
    assert ratio > 1.5


def test_reward_guess_uses_each_samples_own_prompt(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, PromptAwareReward(), reward_scale=1.0)
    samples = trainer.sample_epoch(0)
    b = batch_at(samples, 3)

    def guess(rows):
        return trainer.reward_guess(b.next_latents[rows], b.step_index[rows] + 1, b.prompt_embeds[rows], b.negative_prompt_embeds[rows],
                                    [b.prompts[i] for i in rows], [{} for _ in rows])

    together = guess([0, 1])
    for i in range(2):
        alone = guess([i])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-7)
        naive = Naive(trainer, batch_at(samples.select([i]), 3))
        torch.testing.assert_close(alone, naive.guess(b.next_latents[i:i + 1], 4).float(), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(together[0], together[1])


@pytest.mark.parametrize("model", ["policy", "reference"])
def test_jacobian_free_guess_holds_the_noise_prediction_constant(tmp_path, tiny_pipeline, model):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=1.0, jacobian_free_reward_gradient=True, flow_guess_model=model)
    samples = trainer.sample_epoch(0)
    randomise(trainer, flow=False, seed=6)  # recorded ε (old policy) != reference ε now
    b = batch_at(samples, 2)
    got = trainer.reward_guess(b.next_latents, b.step_index + 1, b.prompt_embeds, b.negative_prompt_embeds, b.prompts, [{}, {}],
                               recorded_epsilon=b.next_epsilons)
    a = trainer.schedule.alphas_cumprod[3].float()
    naive = Naive(trainer, b)
    eps = b.next_epsilons if model == "policy" else naive.eps(b.next_latents.double(), 3, reference=True).detach().float()
    x0 = predict_x0(b.next_latents, eps, a).detach().requires_grad_(True)
    rewards, _ = trainer.reward_fn(trainer.pipeline.decode(x0), b.prompts, [{}, {}])
    expected = a * torch.autograd.grad(rewards.sum(), x0)[0] / a.sqrt()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    trainer.config.jacobian_free_reward_gradient = False
    assert not torch.allclose(got, naive.guess(b.next_latents, 3).float(), rtol=1e-3)  # an approximation, not the exact guess


def test_terminal_term_and_the_flow_head_at_the_last_transition(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline)
    randomise(trainer, lora=False)
    samples = trainer.sample_epoch(0)
    last = batch_at(samples, K - 1)
    _, terms = trainer.compute_loss(last)
    with torch.no_grad():
        g0 = trainer.flow_head(last.next_latents, torch.zeros(2, dtype=torch.long), samples.prompt_embeds)
        g1 = trainer.flow_head(last.latents, trainer.schedule.timesteps[K - 1].repeat(2), samples.prompt_embeds)
    torch.testing.assert_close(terms["loss_terminal"], (g0**2).mean(), rtol=1e-5, atol=0)
    assert terms["loss_forward"].item() == 0.0  # no g(x_0) in the forward target, β = 0, policy == reference
    # pathwise: the reverse term also reaches x_1, whose target there is the exact flow gradient at x_0 (0 at β = 0)
    var = trainer.schedule.std[K - 1].float() ** 2
    torch.testing.assert_close(terms["loss_reverse"], var * (g1**2).mean(), rtol=1e-4, atol=1e-12)
    trainer.config.reverse_loss_type = "score"  # the paper's: interior transitions only
    _, score = trainer.compute_loss(last)
    assert score["loss_reverse"].item() == 0.0


@pytest.mark.parametrize("step", [1, K - 1])
def test_reference_reverse_equals_pathwise_at_the_reference_and_drops_the_policy_residual(tmp_path, tiny_pipeline, step):
    """The two forms carry the next state's flow gradient back to x_k through J_refᵀ and J_θᵀ: identical while the policy is the
    reference; once it moves, the pathwise target moves with the policy's residual and the reference one only through x_{k-1}."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=20.0)
    randomise(trainer, lora=False)
    batch = batch_at(trainer.sample_epoch(0), step)

    def reverse(kind):
        trainer.config.reverse_loss_type = kind
        return trainer.compute_loss(batch)[1]

    at_ref = {kind: reverse(kind) for kind in ("pathwise", "reference")}
    assert at_ref["pathwise"]["loss_reverse"] > 0
    torch.testing.assert_close(at_ref["reference"]["loss_reverse"], at_ref["pathwise"]["loss_reverse"], rtol=1e-4, atol=0)
    torch.testing.assert_close(at_ref["reference"]["loss_forward"], at_ref["pathwise"]["loss_forward"], rtol=0, atol=0)
    randomise(trainer, flow=False, lora_std=0.3)  # the same transitions, the policy moved off the reference
    moved = {kind: reverse(kind) for kind in ("pathwise", "reference")}
    gap = abs(moved["reference"]["loss_reverse"].item() - moved["pathwise"]["loss_reverse"].item())
    assert gap > 2e-3 * moved["pathwise"]["loss_reverse"].item(), gap / moved["pathwise"]["loss_reverse"].item()
    # the reference target ignores the policy except through the sampled states: same loss as before the policy moved
    torch.testing.assert_close(moved["reference"]["loss_reverse"], at_ref["reference"]["loss_reverse"], rtol=1e-5, atol=0)


def test_regulariser_weight_scales_with_the_reward_scale_squared(tmp_path, tiny_pipeline):
    """λ given at β_λ is applied as λ·(β/β_λ)²: the total loss adds exactly that multiple of the logged regulariser."""
    plain = NablaGFlowNetConfig(reward_scale=10.0, unet_reg_scale=100.0)
    scaled = NablaGFlowNetConfig(reward_scale=10.0, unet_reg_scale=100.0, unet_reg_reference_reward_scale=30.0)
    assert plain.regulariser_weight == 100.0
    assert scaled.regulariser_weight == pytest.approx(100.0 / 9, rel=1e-12)
    assert NablaGFlowNetConfig(reward_scale=30.0, unet_reg_scale=100.0, unet_reg_reference_reward_scale=30.0).regulariser_weight == 100.0
    with pytest.raises(ValueError, match="unet_reg_reference_reward_scale"):
        NablaGFlowNetConfig(unet_reg_reference_reward_scale=0.0)

    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=10.0, unet_reg_scale=100.0, unet_reg_reference_reward_scale=30.0)
    randomise(trainer)
    batch = batch_at(trainer.sample_epoch(0), 2)
    randomise(trainer, flow=False, seed=4)  # the policy moved since sampling: the regulariser is nonzero
    loss, terms = trainer.compute_loss(batch)
    assert terms["loss_reg"] > 0
    rest = terms["loss_forward"] + terms["loss_reverse"] + terms["loss_terminal"]
    torch.testing.assert_close(loss.detach(), rest + (100.0 / 9) * terms["loss_reg"], rtol=1e-5, atol=0)
    assert abs(loss.item() - (rest + 100.0 * terms["loss_reg"]).item()) > 1e-3 * loss.item()  # not the unscaled λ


def test_saturating_guess_scales_the_regulariser_per_transition_by_the_guess_size(tmp_path, tiny_pipeline):
    """With the saturating γ the trust region follows the guess's size step by step: λ·(β γ_k(β) / (β_λ γ_k(β_λ)))², γ_k at
    the transition's next state. It is (β/β_λ)² on the last transition, larger on the noisy ones, and 1 at β = β_λ."""
    beta, beta_l = 3.0, 30.0
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=beta, unet_reg_scale=100.0, unet_reg_reference_reward_scale=beta_l,
                           reward_gradient_scaling="saturating", reward_gradient_saturation_reward_scale=beta_l)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    steps = torch.tensor([0, K - 1])  # one noisy transition, one last transition
    batch = TransitionBatch.from_trajectories(samples, steps)
    randomise(trainer, flow=False, seed=4)
    loss, terms = trainer.compute_loss(batch)
    a = trainer.schedule.alphas_cumprod[steps + 1].double()  # γ at x_{k-1}; ᾱ = 1 at x_0
    a = torch.where(steps + 1 == K, torch.ones_like(a), a)

    def gamma(b):
        return a / (a + b / beta_l * (1 - a))

    factor = (beta * gamma(beta) / (beta_l * gamma(beta_l))) ** 2
    assert factor[1].item() == pytest.approx((beta / beta_l) ** 2, rel=1e-9) and factor[0] > 20 * factor[1]
    with torch.no_grad():
        eps = trainer._guided(trainer.pipeline.denoiser, batch.latents.float(), trainer.schedule.timesteps[steps], batch, None,
                              trainer.schedule.level(steps, like=batch.latents.float()))
    per_row = ((eps - batch.epsilons.float()) ** 2).flatten(1).mean(1).double()
    expected_reg = 100.0 * (factor * per_row).mean()
    rest = terms["loss_forward"] + terms["loss_reverse"] + terms["loss_terminal"]
    torch.testing.assert_close((loss.detach() - rest).double(), expected_reg, rtol=1e-4, atol=0)
    torch.testing.assert_close(terms["loss_reg"].double(), per_row.mean(), rtol=1e-4, atol=0)  # logged unweighted
    # at β = β_λ the factor is exactly 1, and the loss is the squared γ's to the last bit
    same = {}
    for scaling in ("saturating", "squared"):
        trainer.config.reward_scale = beta_l
        trainer.config.reward_gradient_scaling = scaling
        same[scaling] = trainer.compute_loss(batch)[0]
    assert torch.equal(same["saturating"], same["squared"])


def test_reference_reverse_needs_full_pretrained_strength():
    with pytest.raises(ValueError, match="pretrained_strength"):
        NablaGFlowNetConfig(reverse_loss_type="reference", pretrained_strength=0.5)


@pytest.mark.parametrize("on_forward", [False, True])
def test_which_term_trains_which_parameters(tmp_path, tiny_pipeline, on_forward):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=5.0, train_flow_head_on_forward_loss=on_forward, unet_reg_scale=0.0)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)

    def grads(reverse_scale):
        trainer.config.reverse_loss_scale = reverse_scale
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, terms = trainer.compute_loss(batch)
        loss.backward()
        lora = torch.cat([p.grad.flatten() for p in trainer.pipeline.lora_parameters()])
        flow = [p.grad.flatten() for p in trainer.flow_head.parameters() if p.grad is not None]
        return lora, (torch.cat(flow) if flow else None), terms

    lora_on, flow_on, terms = grads(1.0)
    lora_off, flow_off, _ = grads(0.0)
    assert terms["loss_reverse"] > 0 and lora_on.abs().max() > 0
    torch.testing.assert_close(lora_on, lora_off, rtol=1e-5, atol=1e-9)  # the reverse term never trains the policy
    assert (flow_on - (flow_off if flow_off is not None else 0)).abs().max() > 1e-6  # ... it trains the flow head
    if on_forward:
        assert flow_off is not None and flow_off.abs().max() > 0  # the forward term trains the flow head too
    else:
        assert flow_off is None or flow_off.abs().max() == 0  # the forward term trains the policy only


def test_paper_config_is_the_papers_loss():
    paper = NablaGFlowNetConfig.paper(sample_num_steps=10, reward_scale=3.0)
    assert (paper.transition_loss_weighting, paper.flow_guess_model, paper.reverse_loss_type) == ("none", "policy", "score")
    assert paper.train_flow_head_on_forward_loss and paper.flow_learning_rate == paper.train_learning_rate == 1e-3
    assert paper.reward_scale == 3.0 and paper.sample_num_steps == 10
    default = NablaGFlowNetConfig()
    assert (default.transition_loss_weighting, default.flow_guess_model, default.reverse_loss_type) == ("variance", "reference", "pathwise")
    with pytest.raises(ValueError, match="flow_guess_model"):
        NablaGFlowNetConfig(flow_guess_model="teacher")
    with pytest.raises(ValueError, match="reverse_loss_type"):
        NablaGFlowNetConfig(reverse_loss_type="forward")


def test_score_residual_from_the_noise_difference_survives_bf16_autocast():
    """s_θ − s_ref at σ ≈ 0.02: from the noise difference within 1e-3 of float64 under bf16 autocast; the difference of
    two scores, computed in the precision autocast gives the activations, is not."""
    torch.manual_seed(0)
    shape = (4, 4, 8, 8)
    x = torch.randn(shape, dtype=torch.float64)
    eps_ref = torch.randn(shape, dtype=torch.float64)
    eps = eps_ref + 1e-3 * torch.randn(shape, dtype=torch.float64)  # a LoRA that has moved a little
    cx, ce, std = torch.tensor(1.0006, dtype=torch.float64), torch.tensor(-0.0205, dtype=torch.float64), torch.tensor(0.021, dtype=torch.float64)
    x_next = cx * x + ce * eps + std * torch.randn(shape, dtype=torch.float64)
    exact = ce * (eps - eps_ref) / std**2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_residual(eps.float(), eps_ref.float(), ce.float(), std.float())
        lo = {k: v.to(torch.bfloat16) for k, v in dict(x=x, x_next=x_next, eps=eps, eps_ref=eps_ref).items()}
        naive = (-(lo["x_next"] - step_mean(lo["x"], lo["eps"], cx.float(), ce.float()))
                 + (lo["x_next"] - step_mean(lo["x"], lo["eps_ref"], cx.float(), ce.float()))) / std.float() ** 2
    rel = lambda v: ((v.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert got.dtype == torch.float32 and rel(got) < 1e-3
    assert rel(naive) > 1e-1


def test_transition_selection(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, sample_num_steps=10, train_timestep_fraction=0.3)
    assert trainer.config.num_train_timesteps == 4
    samples = trainer.sample_epoch(0)
    steps = trainer.select_transitions(samples, epoch=0, inner_epoch=0)
    assert steps.shape == (2, 4)
    assert (steps[:, -1] == 9).all()
    for row in steps.tolist():  # stratified: one pick in each of [0,3), [3,6), [6,9)
        assert 0 <= row[0] < 3 <= row[1] < 6 <= row[2] < 9
    assert torch.equal(steps, trainer.select_transitions(samples, epoch=0, inner_epoch=0))
    trainer.config.low_var_subsampling = False
    uniform = trainer.select_transitions(samples, epoch=0, inner_epoch=0)
    for row in uniform.tolist():
        assert row[-1] == 9 and len(set(row)) == 4 and max(row[:-1]) < 9 and row[:-1] == sorted(row[:-1])


def test_v_prediction_models_train_with_the_same_guarantees(tmp_path):
    from trl_gfn import DiffusionPipelineForRL
    from trl_gfn.testing import tiny_stable_diffusion

    trainer = make_trainer(tmp_path, DiffusionPipelineForRL(tiny_stable_diffusion(prediction_type="v_prediction")))
    assert trainer.schedule.prediction_type == "v_prediction"
    samples = trainer.sample_epoch(0)
    _, terms = trainer.compute_loss(batch_at(samples, 2))
    assert terms["loss_forward"].item() == 0.0 and terms["loss_reg"].item() < 1e-10


def test_variance_weighting_scales_each_transition_by_its_variance(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=50.0)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    for step in (1, K - 1):
        batch = batch_at(samples, step)
        trainer.config.transition_loss_weighting = "none"
        _, plain = trainer.compute_loss(batch)
        trainer.config.transition_loss_weighting = "variance"
        _, weighted = trainer.compute_loss(batch)
        variance = trainer.schedule.std[step].float() ** 2
        for key in ("loss_forward", "loss_reverse"):
            torch.testing.assert_close(weighted[key], plain[key] * variance, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(weighted["loss_terminal"], plain["loss_terminal"])
    assert plain["loss_forward"] > 0


def test_flow_gradient_is_the_guess_plus_the_flow_head(tmp_path, tiny_pipeline):
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=10.0)
    randomise(trainer, lora_std=0.2)  # a policy far enough from the reference that float32 ε differences are resolved
    samples = trainer.sample_epoch(0)
    b = batch_at(samples, 2)
    naive = Naive(trainer, b)
    got = trainer.flow_gradient(b.latents, 2, b.prompts)
    torch.testing.assert_close(got, (naive.guess(b.latents, 2) + naive.g(b.latents, 2)).float(), rtol=1e-4, atol=1e-6)
    final = trainer.flow_gradient(samples.latents[:, K], K, b.prompts)  # at x_0: β ∇r exactly, no flow head
    torch.testing.assert_close(final, naive.guess(samples.latents[:, K], K).float(), rtol=1e-4, atol=1e-7)
    residual = trainer.policy_score_residual(b.latents, 2, b.prompts)
    s = trainer.schedule
    x = b.latents.double()
    expected = (naive.mean(x, 2, False) - naive.mean(x, 2, True)) / s.std[2].double() ** 2
    assert ((residual.double() - expected).norm() / expected.norm()).item() < 1e-4


def test_a_flow_head_that_can_never_shape_the_policy_is_reported():
    """K = 8 at the default f = 0.1 trains only the last transition (int(8·0.1) + 1 = 1), whose target has no g term."""
    with pytest.warns(UserWarning, match="use_flow_head has no effect.*train_timestep_fraction >= 0.125"):
        NablaGFlowNetConfig(sample_num_steps=8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NablaGFlowNetConfig(sample_num_steps=8, train_timestep_fraction=0.125)  # one interior transition: fine
        NablaGFlowNetConfig(sample_num_steps=8, use_flow_head=False)


def test_posterior_averaged_guess_is_the_gradient_of_the_log_mean_exp(tmp_path, tiny_pipeline):
    """guess_posterior_samples = M: Σ_i softmax(β r_i) ∇r(x̂_0 + sqrt(1 − ᾱ) ε_i), = (1/β) ∇ log mean_i exp(β r_i) by autograd."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=40.0, guess_posterior_samples=4)
    samples = trainer.sample_epoch(0)
    x0 = samples.latents[:, 2].clone()
    a = torch.tensor([0.3, 0.7])
    prompts = list(samples.prompts)
    torch.manual_seed(5)
    got, mean_reward = trainer.guess_reward_gradient(x0, a, prompts, [{}] * 2, return_rewards=True)
    torch.manual_seed(5)
    noise = torch.randn((4, *x0.shape))
    y = x0.detach().clone().requires_grad_(True)
    points = y.unsqueeze(0) + (1 - a).sqrt().view(1, 2, 1, 1, 1) * noise
    images = trainer.pipeline.decode(points.flatten(0, 1))
    r = trainer.reward_fn(images, prompts * 4, [{}] * 8)[0].view(4, 2)
    objective = (torch.logsumexp(40.0 * r, 0) - math.log(4)) / 40.0
    (expected,) = torch.autograd.grad(objective.sum(), y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert mean_reward.shape == (2,)
    # at ᾱ = 1 (no posterior spread) it is the one-point gradient
    one = make_trainer(tmp_path, tiny_pipeline, reward_scale=40.0)
    torch.testing.assert_close(trainer.guess_reward_gradient(x0, torch.ones(2), prompts, [{}] * 2),
                               one.guess_reward_gradient(x0, torch.ones(2), prompts, [{}] * 2), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="guess_posterior_samples"):
        NablaGFlowNetConfig(guess_posterior_samples=0)


def test_guess_clip_quantile_clips_interior_guesses_at_the_previous_epochs_quantile(tmp_path, tiny_pipeline):
    """VGG-Flow's quantile clipping of ∇r(x̂_0): nothing clipped in the first epoch; afterwards per-sample norms above the
    previous epoch's q-quantile are scaled down to it, direction kept; the last transition's exact β∇r(x_0) is never
    clipped; the threshold survives a checkpoint."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=40.0, guess_clip_quantile=0.5, num_epochs=1)
    samples = trainer.sample_epoch(0)
    x0 = samples.latents[:, 3].clone()
    prompts = list(samples.prompts)
    raw = trainer.guess_reward_gradient(x0, torch.tensor([0.5, 0.5]), prompts, [{}] * 2)
    raw_norms = raw.flatten(1).norm(dim=1)
    assert raw_norms[0] != raw_norms[1]
    trainer._guess_clip_threshold = float(raw_norms.mean())
    clipped = trainer.guess_reward_gradient(x0, torch.tensor([0.5, 0.5]), prompts, [{}] * 2)
    big, small = (0, 1) if raw_norms[0] > raw_norms[1] else (1, 0)
    torch.testing.assert_close(clipped[small], raw[small])
    torch.testing.assert_close(clipped[big].norm(), raw_norms.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(clipped[big] / clipped[big].norm(), raw[big] / raw[big].norm(), rtol=1e-5, atol=1e-8)
    # the final state's guess is the exact β∇r(x_0), whatever the threshold
    trainer._guess_clip_threshold = 1e-12
    final = samples.latents[:, K]
    got = trainer.reward_guess(final, torch.full((2,), K), samples.prompt_embeds, samples.negative_prompt_embeds, prompts, [{}] * 2)
    exact, _ = trainer.reward_gradient(final, prompts, [{}] * 2)
    torch.testing.assert_close(got, 40.0 * exact)
    # training: the first epoch clips nothing and sets the threshold to the q-quantile of the norms it saw
    fresh = make_trainer(tmp_path / "fresh", tiny_pipeline, reward_scale=40.0, guess_clip_quantile=0.5, num_epochs=1)
    seen = []
    original = fresh.clip_guess_gradient

    def spy(grad):
        out = original(grad)
        seen.append((grad.flatten(1).norm(dim=1), out.flatten(1).norm(dim=1)))
        return out

    fresh.clip_guess_gradient = spy
    fresh.train()
    assert seen and all(torch.equal(a, b) for a, b in seen)
    norms = torch.cat([a for a, _ in seen]).double()
    assert fresh._guess_clip_threshold == pytest.approx(float(torch.quantile(norms, 0.5)), rel=1e-6)
    assert fresh.checkpoint_state()["guess_clip_threshold"] == fresh._guess_clip_threshold
    other = make_trainer(tmp_path / "other", tiny_pipeline, reward_scale=40.0, guess_clip_quantile=0.5)
    other.load_checkpoint_state(fresh.checkpoint_state())
    assert other._guess_clip_threshold == fresh._guess_clip_threshold
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="guess_clip_quantile"):
            NablaGFlowNetConfig(guess_clip_quantile=bad)


def test_linearised_importance_weights_against_gaussian_log_densities(tmp_path, tiny_pipeline):
    """w ∝ P_ref(x'|x)·exp(f(x')·(x' − μ_old)) / P_old(x'|x) per transition, from two float64 Gaussian log-densities: centred,
    clipped at ±c and normalised to mean 1 among the rows of one step."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=20.0, importance_weighting="linearised")
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    randomise(trainer, flow=False, seed=5, lora_std=0.3)  # the reference differs from the sampling policy
    batch = batch_at(samples, 2)
    x, x_next, idx, last, inter, t, a, cx, ce, std = trainer._transition(batch)
    with trainer.pipeline.reference_mode(), torch.no_grad():
        eps_ref = trainer._guided(trainer.local("unet"), x, t, batch, None, a)
    eps_old = batch.epsilons.float()
    flow = torch.randn_like(x) * 3.0
    d = {k: v.double() for k, v in dict(x=x, xn=x_next, eo=eps_old, er=eps_ref, cx=cx, ce=ce, s=std, f=flow).items()}
    mu_old, mu_ref = d["cx"] * d["x"] + d["ce"] * d["eo"], d["cx"] * d["x"] + d["ce"] * d["er"]

    def logn(y, mu):
        return (-(y - mu) ** 2 / (2 * d["s"] ** 2) - torch.log(d["s"]) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    log_w = logn(d["xn"], mu_ref) - logn(d["xn"], mu_old) + (d["f"] * (d["xn"] - mu_old)).flatten(1).sum(1)
    assert log_w.std() > 0.1  # a non-trivial case
    for clip in (100.0, 0.05):
        trainer.config.importance_log_weight_clip = clip
        w = trainer.transition_importance_weights(x, x_next, idx, eps_old, eps_ref, flow, cx, ce, std).flatten()
        expected = (log_w - log_w.mean()).clamp(-clip, clip).exp()
        torch.testing.assert_close(w.double(), expected / expected.mean(), rtol=2e-4, atol=0)
    assert w.max() / w.min() <= math.exp(0.1) * (1 + 1e-5)
    # rows of different steps are normalised separately
    mixed = idx.clone()
    mixed[0] = idx[0] + 1
    w = trainer.transition_importance_weights(x, x_next, mixed, eps_old, eps_ref, flow, cx, ce, std).flatten()
    assert w[0].item() == pytest.approx(1.0) and w[1:].mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("step", [1, K - 1])
def test_importance_weighted_terms_are_the_weighted_mean_of_the_single_transition_terms(tmp_path, tiny_pipeline, step):
    """The forward and reverse terms of a batch are mean_i w_i·term_i (a single transition has w = 1); the terminal term and the
    regulariser are not weighted."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=20.0, importance_weighting="linearised", sample_batch_size=3, train_batch_size=3)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    randomise(trainer, flow=False, seed=5, lora_std=0.3)
    batch = batch_at(samples, step)
    _, weighted = trainer.compute_loss(batch)
    x, x_next, idx, *_, a, cx, ce, std = trainer._transition(batch)
    t = trainer.schedule.timesteps[idx]
    with trainer.pipeline.reference_mode(), torch.no_grad():
        eps_ref = trainer._guided(trainer.local("unet"), x, t, batch, None, a)
    flow = trainer.flow_gradient(x_next, step + 1, batch.prompts)
    if step == K - 1:
        flow = trainer.reward_guess(x_next, idx + 1, batch.prompt_embeds, batch.negative_prompt_embeds, batch.prompts, batch.prompt_metadata)
    w = trainer.transition_importance_weights(x, x_next, idx, batch.epsilons.float(), eps_ref, flow, cx, ce, std).flatten()
    assert w.std() > 3e-3  # the weights are not all 1
    singles = [trainer.compute_loss(batch_at(samples.select([i]), step))[1] for i in range(3)]
    for key in ("loss_forward", "loss_reverse"):
        expected = sum(w[i] * singles[i][key] for i in range(3)) / 3
        torch.testing.assert_close(weighted[key], expected, rtol=2e-4, atol=1e-10)
    for key in ("loss_terminal", "loss_reg"):
        torch.testing.assert_close(weighted[key], sum(s[key] for s in singles) / 3, rtol=2e-4, atol=1e-10)


def test_importance_weighting_is_validated():
    with pytest.raises(ValueError, match="importance_weighting"):
        NablaGFlowNetConfig(importance_weighting="exact")
    with pytest.raises(ValueError, match="importance_weighting"):
        NablaGFlowNetConfig(importance_weighting="linearised", flow_estimator="monte_carlo", value_warmup_trajectories=0)
    with pytest.raises(ValueError, match="importance_log_weight_clip"):
        NablaGFlowNetConfig(importance_log_weight_clip=0.0)


def test_anchor_regulariser_pulls_towards_the_reference_prediction(tmp_path, tiny_pipeline):
    """λ_ref·(β/β_λ)²·mean‖ε̂_θ − ε̂_ref‖² is added to the loss (ε̂ both guided, at x_k); it vanishes while the policy is the
    reference and, unlike the trust region, does not vanish at the sampling policy."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=10.0, unet_reg_scale=0.0, unet_anchor_reg_scale=3.0,
                           unet_reg_reference_reward_scale=30.0)
    assert trainer.config.anchor_regulariser_weight == pytest.approx(3.0 / 9, rel=1e-12)
    randomise(trainer, lora=False)
    for p in trainer.pipeline.lora_parameters():
        torch.nn.init.zeros_(p)
    samples = trainer.sample_epoch(0)
    batch = batch_at(samples, 2)
    assert trainer.compute_loss(batch)[1]["loss_reg_anchor"] == 0  # the policy is the reference
    randomise(trainer, flow=False, seed=4, lora_std=0.3)
    samples = trainer.sample_epoch(1)  # the sampling policy is the moved policy: the trust region would be 0
    batch = batch_at(samples, 2)
    loss, terms = trainer.compute_loss(batch)
    x, _, idx, *_, a, _, _, _ = trainer._transition(batch)
    t = trainer.schedule.timesteps[idx]
    with torch.no_grad():
        eps = trainer._guided(trainer.local("unet"), x, t, batch, None, a)
        with trainer.pipeline.reference_mode():
            eps_ref = trainer._guided(trainer.local("unet"), x, t, batch, None, a)
    expected = ((eps.double() - eps_ref.double()) ** 2).mean()
    assert expected > 1e-6
    torch.testing.assert_close(terms["loss_reg_anchor"].double(), expected, rtol=1e-4, atol=0)
    rest = terms["loss_forward"] + terms["loss_reverse"] + terms["loss_terminal"]
    torch.testing.assert_close(loss.detach(), rest + (3.0 / 9) * terms["loss_reg_anchor"], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="unet_anchor_reg_scale"):
        NablaGFlowNetConfig(unet_anchor_reg_scale=-1.0)


def test_reward_scale_warmup_ramps_beta_in_every_term(tmp_path, tiny_pipeline):
    """β_u = β·min(1, (u + 1)/N): at update u the guess, the exact terminal gradient and the regulariser's (β/β_λ)² use β_u."""
    trainer = make_trainer(tmp_path, tiny_pipeline, reward_scale=20.0, unet_reg_scale=5.0, unet_reg_reference_reward_scale=20.0)
    randomise(trainer)
    samples = trainer.sample_epoch(0)
    randomise(trainer, flow=False, seed=4)  # the regulariser is nonzero
    full = {step: trainer.compute_loss(batch_at(samples, step))[1] for step in (1, K - 1)}
    trainer.config.reward_scale_warmup_updates = 4
    for u, frac in ((0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)):
        trainer.state.global_step = u
        assert trainer.reward_scale_now == pytest.approx(20.0 * frac)
        for step in (1, K - 1):
            loss, terms = trainer.compute_loss(batch_at(samples, step))
            torch.testing.assert_close(terms["norm_reward_guess"], frac * full[step]["norm_reward_guess"], rtol=1e-4, atol=0)
            assert terms["reward_scale_now"].item() == pytest.approx(20.0 * frac)
            rest = terms["loss_forward"] + terms["loss_reverse"] + terms["loss_terminal"]
            torch.testing.assert_close(loss.detach(), rest + 5.0 * frac**2 * terms["loss_reg"], rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="reward_scale_warmup_updates"):
        NablaGFlowNetConfig(reward_scale_warmup_updates=-1)
