"""How far can K Gaussian transitions with the sampler's own variances go towards p_base·exp(β r), when their mean shift
is fitted to the *exact* flow? A 1-D two-class analogue of the digits benchmark, computed exactly on a grid (no training,
no sampling noise), to tell the transition family's limit apart from the flow estimate's.

The "base model" is exact: its data are a mixture of two narrow Gaussians, class "S" at −1 (weight ``--mass_s``, the digits
model's base mass on {0, 8} is 0.19) and "outside S" at +1, and its ε̂ is the exact noise prediction of that mixture at
every noise level, so the K-step sampler (the bundled digits model's DDIM scheduler, η = 1: the benchmark's) is the
reference chain. The reward is a confident classifier's r(x) = log σ(−c·x). The target is that chain's final marginal
times exp(β r), and the exact log-flows log F̃_k(x) = log E_ref[exp(β r(x_0)) | x_k] follow by backward recursion on the grid.
Each row is a sampler whose step k is N(μ_k(x_k), σ_k²) with the reference's σ_k, except the second:

- ``reference``: μ_k = the reference mean (the base model);
- ``exact tilted transitions``: P_ref(x'|x)·F̃(x')/F̃(x) itself, not Gaussian: the best any sampler can do from the fixed
  initial noise N(0, 1) (the target's own x_K marginal is N(0, 1)·F̃(x_K), nearly the same at K = 10; started from it, the
  chain reproduces the target exactly, which ``results.json`` records as a check of the flows);
- ``local fit, exact flow``: the fixed point of the residual ∇-DB forward term fitted on the sampler's own x_{k-1},
  (μ_k − μ_ref)/σ_k² = E_{N(μ_k, σ_k²)}[∇ log F̃(x_{k-1})], i.e. what the shipped loss converges to with a perfect flow;
- ``ideal transition's mean``: μ_k = the mean of the exact tilted transition (the limit of ``flow_target_rollouts``);
- ``path-KL optimum``: the mean shifts that minimise KL(sampler's path ‖ target's path), by dynamic programming over a grid
  of means: the best any Gaussian mean shift with these variances can do by that measure;
- ``local fit, shipped guess``: the local fit with the one-step guess β·γ_k·d/dx r(x̂_0(x)) (the shipped saturating γ_k
  of the digits configuration, x̂_0 from the exact ε̂; the exact β r at the last state) in place of ∇ log F̃;
- ``local fit, exact flow × f`` for each f of ``--flow_scales``: the local fit to f·∇ log F̃. In one dimension a guess can
  only err in size; in the digits model's 256 dimensions a guess of the flow's norm at cosine f to it has f·∇ log F̃ as
  its component along the flow, so these rows show what following only that component costs at each β.

Printed per K and β: each sampler's mass on S and its TV to the target (|mass on S − the target's|, two classes).

    python benchmarks/gaussian_transition_limit.py                       # β = 3, 10, 30; K = 10, 20; ~5 min on 2 cores
    python benchmarks/gaussian_transition_limit.py --betas 3 --steps 10  # one setting, ~30 s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

ROWS = ("reference", "exact tilted transitions", "local fit, exact flow", "ideal transition's mean", "path-KL optimum",
        "local fit, shipped guess")


def scaled_row(f: float) -> str:
    return f"local fit, exact flow × {f:g}"


def _positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _non_negative_floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=_non_negative_floats, default=[3.0, 10.0, 30.0], help="β values, comma-separated (default 3,10,30)")
    p.add_argument("--steps", type=_positive_ints, default=[10, 20], help="sampling steps K, comma-separated (default 10,20)")
    p.add_argument("--flow_scales", type=_non_negative_floats, default=[0.25, 0.5], help="f of the rows 'local fit, exact flow × f' (default 0.25,0.5)")
    p.add_argument("--mass_s", type=float, default=0.2, help="base data weight of the class S (default 0.2)")
    p.add_argument("--separation", type=float, default=1.0, help="the classes sit at ∓separation (default 1)")
    p.add_argument("--width", type=float, default=0.15, help="each class's standard deviation in the data (default 0.15)")
    p.add_argument("--sharpness", type=float, default=8.0, help="c of the classifier σ(−c·x) (default 8: r = −8 at the other class)")
    p.add_argument("--grid", type=int, default=1601, help="grid points on [−5, 5] (default 1601; 2401 changes no printed digit of the K = 10, β = 3 row but the last)")
    p.add_argument("--out", default="outputs/gaussian_transition_limit", help="writes results.json and table.md there")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 0 < args.mass_s < 1:
        p.error(f"--mass_s must be in (0, 1), got {args.mass_s}")
    for name in ("separation", "width", "sharpness"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.grid < 101:
        p.error(f"--grid must be >= 101 points, got {args.grid}")
    return args


class Chain:
    """The exact 1-D reference chain of K steps on a grid, its exact flows, and samplers built on it."""

    def __init__(self, args: argparse.Namespace, num_steps: int, beta: float):
        import torch
        from diffusers import DDIMScheduler

        from trl_gfn.assets import BUNDLED_DIGITS_MODEL
        from trl_gfn.diffusion import make_scheduler, transition_schedule
        from trl_gfn.diffusion.gaussian import step_mean

        base = DDIMScheduler.from_pretrained(BUNDLED_DIGITS_MODEL, subfolder="scheduler")
        self.schedule = transition_schedule(make_scheduler(base, "ddpm", eta=1.0), num_steps, eta=1.0)
        self.torch, self.beta, self.args = torch, beta, args
        self.x = torch.linspace(-5.0, 5.0, args.grid, dtype=torch.float64)
        self.dx = float(self.x[1] - self.x[0])
        self.log_reward = -torch.nn.functional.softplus(args.sharpness * self.x)  # log σ(−c x) = log p(S | x)
        s = self.schedule
        self.ref_means = [step_mean(self.x, self.eps_hat(s.alphas_cumprod[i]), s.coef_x[i], s.coef_eps[i]) for i in range(num_steps)]
        self.stds = [float(v) for v in s.std]
        # log F̃ of the state each step lands on: log_flow[i] belongs to x after step i; log_flow[K-1] = β r(x_0)
        log_flow = [beta * self.log_reward]
        for i in reversed(range(1, num_steps)):
            log_flow.insert(0, self.smooth_log(self.ref_means[i], self.stds[i], log_flow[0]))
        self.log_flow = log_flow
        self.in_s = self.x < 0
        self.log_initial = -0.5 * self.x**2  # x_K ~ N(0, 1), unnormalised

    def eps_hat(self, alpha_bar):
        """The exact noise prediction −sqrt(1 − ᾱ)·∇ log p_t of the two-class mixture at ᾱ, on the grid."""
        torch, a = self.torch, float(alpha_bar)
        centres = torch.tensor([-self.args.separation, self.args.separation], dtype=torch.float64) * a**0.5
        var = a * self.args.width**2 + 1 - a
        log_w = torch.log(torch.tensor([self.args.mass_s, 1 - self.args.mass_s], dtype=torch.float64))
        resp = torch.softmax(-0.5 * (self.x[:, None] - centres) ** 2 / var + log_w, dim=1)
        score = (resp * (centres - self.x[:, None]) / var).sum(1)
        return -((1 - a) ** 0.5) * score

    def log_kernel(self, means, std: float):
        """log of the row-normalised Gaussian transition N(means_i, std²) on the grid."""
        logits = -0.5 * ((self.x[None, :] - means[:, None]) / std) ** 2
        return logits - logits.logsumexp(dim=1, keepdim=True)

    def kernel(self, means, std: float, log_tilt=None):
        """Row-normalised Gaussian transition N(means_i, std²) on the grid, times exp(log_tilt) of the landing state if
        given (normalised in log space: at β = 30 a whole row's tilt underflows)."""
        logits = -0.5 * ((self.x[None, :] - means[:, None]) / std) ** 2
        if log_tilt is None:
            return self.torch.softmax(logits, dim=1)
        return self.torch.softmax(self.log_kernel(means, std) + log_tilt[None, :], dim=1)

    def smooth_log(self, means, std: float, log_values):
        """log Σ_j K_ij exp(log_values_j) for the transition N(means_i, std²), in log space (far from S, β r(x_0) is
        below float64's exp range at β = 30)."""
        return (self.log_kernel(means, std) + log_values[None, :]).logsumexp(dim=1)

    def marginal(self, kernels, log_start=None):
        """Final marginal on the grid of the chain with these K transition matrices, from x_K ~ N(0, 1) (or from
        softmax(``log_start``))."""
        q = self.torch.softmax(self.log_initial if log_start is None else log_start, dim=0)
        for kernel in kernels:
            q = q @ kernel
        return q

    def mass_on_s(self, q) -> float:
        return float(q[self.in_s].sum())

    def gaussian_marginal(self, means):
        return self.marginal([self.kernel(m, s) for m, s in zip(means, self.stds)])

    def target_mass(self, reference_marginal) -> float:
        """Mass on S of the reference chain's final marginal times exp(β r), normalised."""
        return self.mass_on_s(self.torch.softmax(reference_marginal.log() + self.beta * self.log_reward, dim=0))

    def tilted_transitions(self, tilted_start: bool = False) -> float:
        """The exact tilted chain from x_K ~ N(0, 1), as a sampler must start; with ``tilted_start`` from N(0, 1)·F̃(x_K),
        the target's own first marginal, where it reproduces the target exactly (a check of the flows)."""
        kernels = [self.kernel(m, s, lf) for m, s, lf in zip(self.ref_means, self.stds, self.log_flow)]
        log_start = self.log_initial + self.smooth_log(self.ref_means[0], self.stds[0], self.log_flow[0]) if tilted_start else None
        return self.mass_on_s(self.marginal(kernels, log_start))

    def local_fit(self, gradients, iterations: int = 48) -> list:
        """Per step and grid state, the root of μ − μ_ref − σ²·E_{N(μ, σ²)}[g] for the target gradient g on the grid, by
        bisection between μ_ref + σ²·min g and μ_ref + σ²·max g (the root lies there; refitting on-policy with a step
        of 1 can oscillate around it, a small learning rate converges to it)."""
        means = []
        for m_ref, s, g in zip(self.ref_means, self.stds, gradients):
            lo, hi = m_ref + s**2 * g.min(), m_ref + s**2 * g.max()
            for _ in range(iterations):
                mid = (lo + hi) / 2
                above = mid - m_ref - s**2 * (self.kernel(mid, s) @ g) > 0
                hi, lo = self.torch.where(above, mid, hi), self.torch.where(above, lo, mid)
            means.append((lo + hi) / 2)
        return means

    def flow_gradients(self):
        return [self.torch.gradient(lf, spacing=self.dx)[0] for lf in self.log_flow]

    def guess_gradients(self, saturation_reward_scale: float):
        """d/dx of β·γ_k·r(x̂_0(x)) at every landing state (γ_k the shipped saturating one); the exact β r at x_0."""
        from trl_gfn.diffusion.noise_level import NoiseLevel

        torch, out = self.torch, []
        K = self.schedule.num_steps
        for i in range(K):
            if i == K - 1:
                values = self.beta * self.log_reward
            else:
                a = self.schedule.alphas_cumprod[i + 1]
                level = NoiseLevel.from_alpha_bar(a)
                x0 = level.predict_x0(self.x, self.eps_hat(a))
                gamma = float(level.gamma("saturating", saturation=self.beta / saturation_reward_scale))
                values = self.beta * gamma * -torch.nn.functional.softplus(self.args.sharpness * x0)
            out.append(torch.gradient(values, spacing=self.dx)[0])
        return out

    def ideal_means(self):
        return [self.kernel(m, s, lf) @ self.x for m, s, lf in zip(self.ref_means, self.stds, self.log_flow)]

    def path_kl_means(self):
        """Backward DP: J_k(x) = min_μ (μ − μ_ref(x))²/(2σ²) + E_{N(μ, σ²)} J_{k-1}, J_0 = −β r, over the mean shifts
        μ − μ_ref on a grid of the states' spacing that contains 0 (E J interpolated linearly between grid means)."""
        torch, x = self.torch, self.x
        shifts = x - x[len(x) // 2]  # the grid's spacing, 0 included
        cost_to_go = -self.beta * self.log_reward
        means = [None] * len(self.stds)
        for i in reversed(range(len(self.stds))):
            s = self.stds[i]
            expected = self.kernel(x, s) @ cost_to_go  # E_{N(μ_j, σ²)} J for every grid mean μ_j
            mu = self.ref_means[i][:, None] + shifts[None, :]
            pos = ((mu - x[0]) / self.dx).clamp(0, len(x) - 1 - 1e-9)
            left = pos.floor().long()
            frac = pos - left
            cost = shifts[None, :] ** 2 / (2 * s**2) + (1 - frac) * expected[left] + frac * expected[left + 1]
            best = cost.argmin(dim=1)
            means[i] = mu.gather(1, best[:, None]).squeeze(1)
            cost_to_go = cost.gather(1, best[:, None]).squeeze(1)
        return means


def measure(args: argparse.Namespace, num_steps: int, beta: float, saturation_reward_scale: float) -> dict:
    chain = Chain(args, num_steps, beta)
    reference = chain.gaussian_marginal(chain.ref_means)
    target = chain.target_mass(reference)
    flow = chain.flow_gradients()

    def gaussian(means) -> float:
        return chain.mass_on_s(chain.gaussian_marginal(means))

    mass = {
        "reference": chain.mass_on_s(reference),
        "exact tilted transitions": chain.tilted_transitions(),
        "local fit, exact flow": gaussian(chain.local_fit(flow)),
        "ideal transition's mean": gaussian(chain.ideal_means()),
        "path-KL optimum": gaussian(chain.path_kl_means()),
        "local fit, shipped guess": gaussian(chain.local_fit(chain.guess_gradients(saturation_reward_scale))),
    }
    for f in args.flow_scales:
        mass[scaled_row(f)] = gaussian(chain.local_fit([f * g for g in flow]))
    return {"steps": num_steps, "beta": beta, "target_mass_on_S": target, "mass_on_S": mass,
            "tilted_chain_from_tilted_start": chain.tilted_transitions(tilted_start=True),
            "tv": {name: abs(m - target) for name, m in mass.items()}}


def markdown(results: list[dict]) -> str:
    names = list(results[0]["mass_on_S"])
    head = "| K | β | target's mass on S | " + " | ".join(f"{name}: mass on S (TV)" for name in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for r in results:
        cells = [f"{r['mass_on_S'][n]:.4f} ({r['tv'][n]:.4f})" for n in names]
        lines.append(f"| {r['steps']} | {r['beta']:g} | {r['target_mass_on_S']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    from trl_gfn.evaluation.digits_benchmark import METHODS

    torch.set_num_threads(args.threads)
    saturation = METHODS["nabla_gfn"][2]["reward_gradient_saturation_reward_scale"]
    results = []
    for num_steps in args.steps:
        for beta in args.betas:
            t0 = time.perf_counter()
            results.append(measure(args, num_steps, beta, saturation))
            r = results[-1]
            print(f"K = {num_steps}, β = {beta:g}: target {r['target_mass_on_S']:.4f}; "
                  + ", ".join(f"{n} {m:.4f}" for n, m in r["mass_on_S"].items()) + f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(results)
    Path(args.out, "table.md").write_text(table)
    Path(args.out, "results.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print(table)
    return results


if __name__ == "__main__":
    main()
