"""
Gaussian diffusion: noise schedules, the training loss and the samplers.

Plain math, no nn.Module: the network is passed into every sampler, so sampling with the
EMA weights is just passing the EMA model. Timesteps are 0-based in code, t = 0..T-1,
where the papers count 1..T: the paper's t is our t + 1, so alpha_bar[t] is Ho et al.'s
alpha-bar_{t+1}, which DDIM (Song et al. 2021) calls alpha_{t+1}.

References: Ho et al. 2020 (DDPM), Song et al. 2021 (DDIM), Nichol & Dhariwal 2021 (cosine
schedule), Salimans & Ho 2022 (v), Ho & Salimans 2022 (classifier-free guidance), Hang et
al. 2023 (min-SNR), Lu et al. 2022 (DPM-Solver++), Meng et al. 2021 (SDEdit), Lugmayr et
al. 2022 (RePaint).
"""
import math

import torch
import torch.nn.functional as F

# What `python sample.py` and train.py's grids draw with unless told, SDE-DPM-Solver++ (50 steps, see
# default_steps): the best at <= 50 network evaluations on the quick-start model (README, "Choosing a sampler")
DEFAULT_METHOD, DEFAULT_ETA = "dpm", 1.0


def linear_betas(T, max_beta=0.999):
    """Ho et al. 2020 sec. 4: beta from 1e-4 to 0.02 for T=1000, scaled by 1000/T for other T
    (as in Nichol & Dhariwal's code) so that the last x_T is noise whatever T is."""
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=max_beta)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def randn(shape, generator=None, device="cpu"):
    """Gaussian noise. A list of generators draws each image from its own, so that an image
    depends only on its seed, not on the batch it is in (as in EDM's generate.py)."""
    if isinstance(generator, (list, tuple)):
        noise = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(noise).to(device)
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    return torch.randn(shape, device=device)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}")


def generators(seed, indices):
    """A generator per image, image i's seeded with seed + i: what `randn` draws each image from."""
    return [torch.Generator().manual_seed(seed + i) for i in indices]


class Diffusion:
    def __init__(self, T=1000, schedule="linear", objective="eps", device="cpu", variance="small", clip=True):
        check_choice("schedule", schedule, ("linear", "cosine"))
        check_choice("objective", objective, ("eps", "v", "x0"))
        check_choice("variance", variance, ("small", "large"))
        if T < 2:
            raise ValueError(f"T must be at least 2, got {T}")
        self.T, self.objective, self.variance, self.clip = T, objective, variance, clip
        # built in float64, kept in float32 on the device
        betas = linear_betas(T) if schedule == "linear" else cosine_betas(T)
        alpha_bar = torch.cumprod(1 - betas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        to = lambda a: a.to(device=device, dtype=torch.float32)
        self.betas, self.alpha_bar = to(betas), to(alpha_bar)
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = to(alpha_bar.sqrt()), to((1 - alpha_bar).sqrt())
        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7: mean = coef_x0 * x0 + coef_xt * xt
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        self.posterior_variance = to(posterior_variance)
        self.posterior_coef_x0 = to(betas * alpha_bar_prev.sqrt() / (1 - alpha_bar))
        self.posterior_coef_xt = to((1 - alpha_bar_prev) * (1 - betas).sqrt() / (1 - alpha_bar))
        # Ho et al.'s two reverse variances sigma_t^2 (sec. 3.2): the posterior's beta-tilde_t
        # ("small"), or beta_t ("large"; its t = 0 entry, unused, is beta-tilde_1 as in their code)
        self.sigma2 = {"small": self.posterior_variance, "large": to(torch.cat([posterior_variance[1:2], betas[1:]]))}
        self.snr = to(alpha_bar / (1 - alpha_bar))
        self.lam = (self.sqrt_alpha_bar / self.sqrt_one_minus_alpha_bar).log()  # log(alpha / sigma), DPM-Solver's time

    def timesteps(self, steps, spacing="linear", start=None):
        """`steps` timesteps from T-1 (or `start`) down to 0: evenly spaced ("linear"), closer
        together near t = 0 ("quadratic", Song et al. 2021 App. D.2) or evenly spaced in lambda,
        half the log-SNR ("logsnr", Lu et al. 2022 sec. 3.3); rounded, moved up where two meet."""
        check_choice("spacing", spacing, ("linear", "quadratic", "logsnr"))
        top = self.T - 1 if start is None else start
        if not 1 <= steps <= top + 1:
            raise ValueError(f"steps must be between 1 and {top + 1} (the timesteps from {top} to 0), got {steps}")
        t = torch.linspace(top, 0, steps, dtype=torch.float64)
        if spacing == "quadratic":
            t = t ** 2 / max(top, 1)
        elif spacing == "logsnr":  # the t whose lambda is nearest to each of evenly spaced lambdas
            lam = self.lam[:top + 1].double().cpu()
            t = (lam[:, None] - torch.linspace(lam[-1], lam[0], steps, dtype=torch.float64)).abs().argmin(0).double()
        below = torch.arange(steps - 1, -1, -1)  # steps below t_i: it is at least t_{i+1} + 1, at most top - i
        t = (t.round() - below).flip(0).cummax(0).values.flip(0) + below
        return torch.minimum(t.long(), top - below.flip(0)).tolist()

    @staticmethod
    def _at(a, t):
        """a[t], shaped (B, 1, 1, 1) to broadcast over images."""
        return a[t].view(-1, 1, 1, 1)

    def q_sample(self, x0, t, eps):
        """Sample x_t ~ q(x_t | x_0), Ho et al. 2020 eq. 4."""
        return self._at(self.sqrt_alpha_bar, t) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t) * eps

    def target(self, x0, t, eps):
        """What the network learns to output: eps, v = sqrt(a) eps - sqrt(1-a) x0, or x0."""
        if self.objective == "eps":
            return eps
        if self.objective == "v":  # Salimans & Ho 2022, sec. 4
            return self._at(self.sqrt_alpha_bar, t) * eps - self._at(self.sqrt_one_minus_alpha_bar, t) * x0
        return x0

    def x0_eps(self, xt, t, out):
        """The network's output (eps, v or x0) as the pair (x0, eps): the one place every sampler
        reads a prediction from."""
        a, s = self._at(self.sqrt_alpha_bar, t), self._at(self.sqrt_one_minus_alpha_bar, t)
        if self.objective == "eps":
            return (xt - s * out) / a, out
        if self.objective == "v":
            return a * xt - s * out, s * xt + a * out
        return out, (xt - a * out) / s

    def loss_weight(self, t, min_snr):
        """Min-SNR-gamma weights (Hang et al. 2023 eq. 10), for the loss on each objective:
        min(SNR, gamma) on x0, divided by SNR on eps and by SNR + 1 on v."""
        snr = self.snr[t]
        w = snr.clamp(max=min_snr)
        return {"eps": w / snr, "v": w / (snr + 1), "x0": w}[self.objective]

    def loss(self, model, x0, y=None, loss_type="mse", min_snr=0.0):
        """Training loss, Ho et al. 2020 Algorithm 1: t uniform per image, MSE on the target.
        Returns each image's loss (their mean is the loss to minimise) and the t it was drawn at."""
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        out = model(self.q_sample(x0, t, eps), t, y)
        error = F.mse_loss if loss_type == "mse" else F.l1_loss
        per_image = error(out.float(), self.target(x0, t, eps), reduction="none").mean(dim=(1, 2, 3))
        if min_snr > 0:
            per_image = per_image * self.loss_weight(t, min_snr)
        return per_image, t

    def predict(self, model, xt, t, y=None, guidance=1.0):
        """(x0, eps) at timestep t (an int), x0 clipped to [-1, 1] and eps re-derived from it
        (unless the diffusion was made with clip=False).
        With labels and guidance != 1, classifier-free guidance (Ho & Salimans 2022 eq. 6):
        out = uncond + guidance * (cond - uncond), both from one batched forward pass."""
        tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        if y is None or guidance == 1.0:
            out = model(xt, tt, y)
        else:
            null = torch.full_like(y, model.config.num_classes)
            cond, uncond = model(torch.cat([xt, xt]), torch.cat([tt, tt]), torch.cat([y, null])).chunk(2)
            out = uncond + guidance * (cond - uncond)
        x0, eps = self.x0_eps(xt, tt, out.float())
        if self.clip:
            x0 = x0.clamp(-1, 1)
            eps = (xt - self.sqrt_alpha_bar[t] * x0) / self.sqrt_one_minus_alpha_bar[t]
        return x0, eps

    def jump(self, x, s, t, generator=None):
        """x_t ~ q(x_t | x_s) for t > s: the forward process from one noise level to a higher one
        (Ho et al. eq. 4 between two steps); s = -1 is the clean image."""
        a = self.alpha_bar[t] / (self.alpha_bar[s] if s >= 0 else 1.0)
        return a.sqrt() * x + (1 - a).sqrt() * randn(x.shape, generator, x.device)

    def ddim_step(self, x0, eps, t, s, eta=0.0, generator=None):
        """x_s from the prediction (x0, eps) made at t, DDIM (Song et al. 2021 eq. 12); s = -1 is
        x0 itself. With s > t and eta = 0 it runs DDIM backwards (inversion, sec. 4.3)."""
        a, a_s = self.alpha_bar[t], self.alpha_bar[s] if s >= 0 else 1.0
        sigma = eta * ((1 - a_s) / (1 - a) * (1 - a / a_s)) ** 0.5 if eta else 0.0
        x = a_s ** 0.5 * x0 + (1 - a_s - sigma ** 2) ** 0.5 * eps
        return x + sigma * randn(x0.shape, generator, x0.device) if eta > 0 and s >= 0 else x

    @torch.inference_mode()
    def ddpm_sample(self, model, shape, variance=None, generator=None, y=None, guidance=1.0, callback=None,
                    x=None, start=None):
        """Ancestral sampling over all T steps, Ho et al. 2020 Algorithm 2, with the posterior
        mean of x0 (eq. 7) so that x0 can be clipped; variance "small" or "large" (see __init__),
        None = the diffusion's own. Samplers start from noise at T-1, or from x at t = start."""
        sigma2, top = self.sigma2[variance or self.variance], self.T - 1 if start is None else start
        x = randn(shape, generator, self.betas.device) if x is None else x
        for i, t in enumerate(range(top, -1, -1)):
            pred, _ = self.predict(model, x, t, y, guidance)
            x = self.posterior_coef_x0[t] * pred + self.posterior_coef_xt[t] * x
            if t > 0:  # no noise on the last step
                x = x + sigma2[t].sqrt() * randn(shape, generator, x.device)
            if callback:
                callback(i, top + 1, x, pred)
        return x

    @torch.inference_mode()
    def ddim_sample(self, model, shape, steps=100, eta=0.0, spacing="linear", generator=None, y=None,
                    guidance=1.0, callback=None, x=None, start=None):
        """DDIM, Song et al. 2021 eq. 12; eta=0 is deterministic, eta=1 is DDPM-like."""
        x = randn(shape, generator, self.betas.device) if x is None else x
        ts = self.timesteps(steps, spacing, start)
        for i, t in enumerate(ts):
            pred, eps = self.predict(model, x, t, y, guidance)
            x = self.ddim_step(pred, eps, t, ts[i + 1] if i + 1 < steps else -1, eta, generator)
            if callback:
                callback(i, steps, x, pred)
        return x

    @torch.inference_mode()
    def ddim_invert(self, model, x0, steps=100, y=None, guidance=1.0):
        """x_{T-1} of images x0 (taken as x at t = 0): DDIM run backwards, eta 0 (Song et al.
        2021 sec. 4.3), so that ddim_sample with the same steps draws about x0 again."""
        x, ts = x0, self.timesteps(steps)[::-1]
        for t, s in zip(ts, ts[1:]):
            pred, eps = self.predict(model, x, t, y, guidance)
            x = self.ddim_step(pred, eps, t, s)
        return x

    @torch.inference_mode()
    def repaint_sample(self, model, shape, x0, mask, steps=250, eta=1.0, jump_length=10, jump_n_sample=10,
                       generator=None, y=None, guidance=1.0, callback=None):
        """Inpainting, RePaint (Lugmayr et al. 2022, Algorithm 1): DDIM steps (eta 1: ancestral
        steps over `steps` of the T) redraw the pixels where mask is 1, and after each step the
        known ones (mask 0) are x0 noised to the level that step reached (x0 after the last).
        Every jump_length steps it goes back as far by q, jump_n_sample - 1 times, to harmonise."""
        ts, x, i = self.timesteps(steps), randn(shape, generator, self.betas.device), 0
        back = dict.fromkeys(range(0, steps - jump_length, jump_length), jump_n_sample - 1)  # by steps left
        evaluations = steps + len(back) * (jump_n_sample - 1) * jump_length
        for n in range(evaluations):
            t, s = ts[i], ts[i + 1] if i + 1 < steps else -1
            pred, eps = self.predict(model, x, t, y, guidance)
            known = x0 if s < 0 else self.q_sample(x0, s, randn(shape, generator, x.device))
            x = torch.lerp(known, self.ddim_step(pred, eps, t, s, eta, generator), mask)
            i += 1
            if back.get(steps - 1 - i):  # resample: back up jump_length steps
                back[steps - 1 - i] -= 1
                x, i = self.jump(x, ts[i], ts[i - jump_length], generator), i - jump_length
            if callback:
                callback(n, evaluations, x, pred)
        return x

    @torch.inference_mode()
    def dpm_sample(self, model, shape, steps=20, eta=0.0, spacing="linear", order=2, generator=None, y=None,
                   guidance=1.0, callback=None, x=None, start=None):
        """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: a 2nd-order multistep solver in
        lambda = log(alpha / sigma), on the predicted x0. eta = 0 solves the probability-flow ODE,
        eta = 1 the reverse SDE (SDE-DPM-Solver++, Lu et al.'s "sde-dpmsolver++" in diffusers):
        x_t decays by exp(-eta h) more each step and fresh noise makes up for it; eta between
        does that over a fraction of each step (as in k-diffusion). The network is evaluated at
        `steps` timesteps above 0; the last step, to sigma = 0, is first order: it lands on the
        predicted x0, as diffusers' does (a 2nd-order one overshoots, see the README)."""
        x = randn(shape, generator, self.betas.device) if x is None else x
        ts = self.timesteps(steps + 1, spacing, start)[:-1]  # t = 0 is where the last step lands, not evaluated
        alpha, sigma, lam = self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar, self.lam
        prev = h_prev = None
        for i, t in enumerate(ts):
            pred, _ = self.predict(model, x, t, y, guidance)
            if i + 1 == steps:  # to sigma = 0 (lambda = infinity): the first-order step gives x0
                x = pred
            else:
                s = ts[i + 1]
                h = lam[s] - lam[t]
                d = pred if prev is None or order == 1 else pred + (pred - prev) * h / (2 * h_prev)  # eq. 12
                x = sigma[s] / sigma[t] * torch.exp(-eta * h) * x - alpha[s] * torch.expm1(-(1 + eta) * h) * d
                if eta > 0:
                    x = x + sigma[s] * (-torch.expm1(-2 * eta * h)).sqrt() * randn(shape, generator, x.device)
                prev, h_prev = pred, h
            if callback:
                callback(i, steps, x, pred)
        return x

    def default_steps(self, method):
        """Network evaluations unless told: T for ddpm, 100 for ddim, 50 for dpm (fewer for a small T)."""
        return {"ddpm": self.T, "ddim": min(100, self.T), "dpm": min(50, self.T - 1)}[method]

    def sample(self, model, shape, method="ddim", steps=None, eta=0.0, spacing="linear", variance=None, x0=None,
               start=None, mask=None, jump=(10, 10), **kwargs):
        """Dispatch to a sampler by name: ddpm (every step), ddim or dpm. With images x0 and a
        `start`, from x0 noised to t = start by q(x_t | x_0) (SDEdit, Meng et al. 2021; start -1:
        x0 itself); with x0 and a mask, RePaint, with ddim steps (ddpm: eta 1, every step)."""
        check_choice("sampling method", method, ("ddpm", "ddim", "dpm"))
        steps = steps or self.default_steps(method)
        if mask is not None:  # (not dpm: RePaint steps back and forth, which its multistep history cannot)
            steps, eta = (steps, eta) if method == "ddim" else (self.T, 1.0)
            return self.repaint_sample(model, shape, x0, mask, steps, eta, *jump, **kwargs)
        if x0 is not None:
            if start < 0:
                return x0.expand(shape).clone()
            kwargs.update(x=self.q_sample(x0, start, randn(shape, kwargs.get("generator"), x0.device)), start=start)
        if method == "ddpm":
            return self.ddpm_sample(model, shape, variance, **kwargs)
        sampler = self.ddim_sample if method == "ddim" else self.dpm_sample
        return sampler(model, shape, steps, eta, spacing, **kwargs)
