"""Tests: CPU only, tiny shapes, fixed seeds. Run with `python -m pytest -q`."""
import csv
import glob
import hashlib
import json
import os
import pickle
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data
import edit
import fid
import sample
import train
import model
from diffusion import Diffusion, cosine_betas, linear_betas, randn
from model import UNet, UNetConfig
import checkpoint
import pretrained
from checkpoint import load as load_checkpoint

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPT = {name: os.path.join(REPO, name) for name in ("train.py", "sample.py", "edit.py")}
TINY = ["--channels", "8,16", "--attention", "0,1", "--num-res", "1", "--neck-length", "1",
        "--time-emb-dim", "16", "--timesteps", "20", "--batch-size", "8", "--log-every", "1",
        "--device", "cpu", "--warmup-steps", "2"]



@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty working folder: nothing of the user's (out/, data/, a
    stray checkpoint) changes a result, and no test writes into the clone."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("config, size", [
    (UNetConfig(1, (8,), (False,), 1, 1, 16), 12),  # one level: no down- or upsampling
    (UNetConfig(3, (8, 16, 16), (False, False, True), 2, 1, 16), 16),
    (UNetConfig(3, (8, 8, 16, 16, 16), (False, True, False, True, True), 1, 0, 16), 16),  # 5 levels
    (UNetConfig(1, (8, 16, 16), (False, False, True), 1, 1, 16, num_classes=10), 28),  # conditional
])
def test_unet_output_shape_matches_input(config, size):
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.randn(2, config.in_channels, size, size)
    y = torch.tensor([3, config.num_classes]) if config.num_classes else None
    assert model(x, torch.tensor([0, 19]), y).shape == x.shape


def test_conditional_unet_uses_the_label():
    torch.manual_seed(0)
    model = UNet(UNetConfig(1, (8, 16), (False, True), 1, 1, 16, num_classes=3)).eval()
    for p in model.parameters():  # the zero-initialised output convs would hide the label
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1])))
    assert torch.equal(model(x, t), model(x, t, torch.tensor([3])))  # no label == index num_classes


def test_sampling_forward_equals_the_training_forward():
    # without autograd the SiLUs run in place: they must not overwrite anything still needed
    torch.manual_seed(0)
    model = UNet(UNetConfig(3, (8, 16, 16), (False, True, True), 2, 1, 16)).eval()
    for p in model.parameters():  # non-zero everywhere, so that every block shows in the output
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 17])
    with torch.inference_mode():
        sampled = model(x, t)
    assert torch.equal(sampled, model(x, t).detach())


def test_unet_config_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig(1, (8, 16), (True,))


# ---------------------------------------------------------------- schedules and q_sample

def test_linear_schedule_endpoints():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_cosine_schedule_is_monotone_and_capped():
    betas = cosine_betas(1000)
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert alpha_bar[0] > 0.9999 and alpha_bar[-1] < 1e-4


def test_q_sample_has_the_right_mean_and_std():
    torch.manual_seed(0)
    d = Diffusion(1000, "cosine")
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 600)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    assert xt.mean().item() == pytest.approx(0.5 * d.sqrt_alpha_bar[600].item(), abs=0.02)
    assert xt.std().item() == pytest.approx(d.sqrt_one_minus_alpha_bar[600].item(), abs=0.02)


def test_forward_jumps_keep_the_marginals_of_q():
    # x_s ~ q(x_s | x0), then jump(s -> t) must be distributed as q(x_t | x0) (RePaint's resampling)
    torch.manual_seed(0)
    d, x0 = Diffusion(1000), torch.full((40000, 1, 1, 1), 0.5)
    for s, t in ((-1, 300), (100, 200), (250, 500)):
        xs = x0 if s < 0 else d.q_sample(x0, torch.full((40000,), s), torch.randn_like(x0))
        xt = d.jump(xs, s, t, torch.Generator().manual_seed(s + 1))
        assert xt.mean().item() == pytest.approx(0.5 * d.sqrt_alpha_bar[t].item(), abs=0.01)
        assert xt.std().item() == pytest.approx(d.sqrt_one_minus_alpha_bar[t].item(), abs=0.01)


def test_ddpm_variances_are_ho_et_al_small_and_large():
    d, betas = Diffusion(50, "linear"), linear_betas(50)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for t in (1, 10, 49):  # eq. 7's beta-tilde, and beta_t
        expected = betas[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
        assert d.sigma2["small"][t].item() == pytest.approx(expected.item(), rel=1e-5)
        assert d.sigma2["large"][t].item() == d.betas[t].item()
    assert d.sigma2["small"][0].item() == 0  # Ho et al.'s code: "large" starts with beta-tilde at t = 1
    assert d.sigma2["large"][0].item() == pytest.approx(d.sigma2["small"][1].item(), rel=1e-6)


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_sampler_adds_the_chosen_variance(variance):
    # x* = 0: the predicted x0 is 0, so the first step is coef_xt x_T + sigma z, with z the next draw
    d, shape, first = Diffusion(50), (2, 1, 4, 4), []
    record = lambda i, steps, x, x0: first.append(x) if i == 0 else None
    d.ddpm_sample(Oracle(d, torch.zeros(1, 1, 4, 4)), shape, variance, torch.Generator().manual_seed(0),
                  callback=record)
    g = torch.Generator().manual_seed(0)
    x_T, z = randn(shape, g), randn(shape, g)
    sigma = (d.betas[49] if variance == "large" else d.posterior_variance[49]).sqrt()
    assert torch.allclose(first[0], d.posterior_coef_xt[49] * x_T + sigma * z, atol=1e-6)
    assert Diffusion(50, variance=variance).variance == variance  # the model's own, when not told


def test_timesteps_start_at_T_minus_1_and_end_at_0():
    d = Diffusion(50)
    for spacing in ("linear", "quadratic", "logsnr"):
        for steps in (1, 2, 7, 49, 50):
            ts = d.timesteps(steps, spacing)
            assert ts[0] == 49 and len(ts) == steps and ts == sorted(set(ts), reverse=True)
            assert steps == 1 or ts[-1] == 0
        assert d.timesteps(50, spacing) == list(range(49, -1, -1))
    with pytest.raises(ValueError):
        d.timesteps(51)
    with pytest.raises(ValueError, match="unknown spacing"):
        d.timesteps(5, "cubic")


def test_linear_spacing_is_the_evenly_rounded_linspace_of_before():
    for T in (20, 37, 1000):
        d = Diffusion(T)
        for steps in range(1, min(T, 120) + 1):
            assert d.timesteps(steps) == torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def test_quadratic_and_logsnr_spacings_are_what_they_say():
    d = Diffusion(1000)
    quadratic = d.timesteps(10, "quadratic")  # t_i = (T-1) (i / 9)^2, Song et al. App. D.2
    assert quadratic == [round(999 * (i / 9) ** 2) for i in range(9, -1, -1)]
    ts = d.timesteps(20, "logsnr")  # even steps in lambda = log(alpha / sigma), as far as integers allow:
    steps = torch.diff(d.lam[ts])  # near t = 0 one step of t moves lambda by more than 0.2
    assert steps.min() > 0 and (steps[:15].max() - steps[:15].min()) / steps[:15].mean() < 0.05


# ---------------------------------------------------------------- samplers against an exact model

class Oracle(torch.nn.Module):
    """The exact predictor for a one-image dataset x*: eps = (xt - sqrt(a) x*) / sqrt(1 - a)."""

    def __init__(self, diffusion, x_star, num_classes=0):
        super().__init__()
        self.d, self.x_star, self.calls = diffusion, x_star, 0
        self.config = UNetConfig(x_star.shape[1], (8,), (False,), num_classes=num_classes)

    def forward(self, xt, t, y=None):
        self.calls += 1
        d, x0 = self.d, self.x_star.expand_as(xt)
        eps = (xt - d._at(d.sqrt_alpha_bar, t) * x0) / d._at(d.sqrt_one_minus_alpha_bar, t)
        return d.target(x0, t, eps)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("method, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 7, 1.0),
                                                ("ddim", 1, 0.0), ("dpm", 10, 0.0), ("dpm", 3, 0.0)])
def test_every_sampler_lands_on_the_single_training_image(objective, method, steps, eta):
    torch.manual_seed(0)
    d = Diffusion(50, "linear", objective)
    x_star = torch.rand(1, 3, 8, 8) * 2 - 1
    x = d.sample(Oracle(d, x_star), (4, 3, 8, 8), method, steps, eta, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x, x_star.expand_as(x), atol=1e-4)


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_objective_conversions_round_trip(objective):
    torch.manual_seed(0)
    d = Diffusion(100, "cosine", objective)
    x0, eps, t = torch.randn(6, 2, 4, 4), torch.randn(6, 2, 4, 4), torch.randint(0, 100, (6,))
    xt = d.q_sample(x0, t, eps)
    x0_back, eps_back = d.x0_eps(xt, t, d.target(x0, t, eps))
    assert torch.allclose(x0_back, x0, atol=1e-3) and torch.allclose(eps_back, eps, atol=1e-3)


def test_min_snr_weights_equal_the_formula():
    d = Diffusion(1000, "linear")
    t = torch.tensor([0, 300, 999])
    alpha_bar = torch.cumprod(1 - linear_betas(1000), 0)[t]  # in float64
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=5.0)
    for objective, expected in [("eps", clipped / snr), ("v", clipped / (snr + 1)), ("x0", clipped)]:
        d.objective = objective
        assert torch.allclose(d.loss_weight(t, 5.0).double(), expected, rtol=1e-5)
    assert snr[0] > 5 > snr[2]  # both sides of gamma are exercised


def test_ddim_eta0_is_deterministic():
    torch.manual_seed(0)
    model = UNet(UNetConfig(1, (8, 16), (False, True), 1, 1, 16)).eval()
    d = Diffusion(20)
    run = lambda: d.ddim_sample(model, (2, 1, 8, 8), 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(), run())


def gaussian_eps(d, c):
    """The exact noise predictor for data ~ N(0, c^2) (an eps-objective model)."""
    def exact_eps(xt, t, y=None):
        a, s = d.sqrt_alpha_bar[t].view(-1, 1, 1, 1), d.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        x0 = a * c ** 2 / (a ** 2 * c ** 2 + s ** 2) * xt  # E[x0 | xt]
        return (xt - a * x0) / s
    return exact_eps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_sampler_keeps_the_marginals_of_gaussian_data(schedule):
    # with the exact predictor, every x_t of Algorithm 2 must be N(0, alpha_bar c^2 + 1 - alpha_bar),
    # which tests the posterior mean and variance (eq. 6-7) at every step, not just the last x0
    d, c, stds = Diffusion(1000, schedule), 0.25, {}
    record = lambda i, steps, x, x0: stds.update({d.T - 2 - i: x.std()})  # x is now x_{t-1}
    x = d.ddpm_sample(gaussian_eps(d, c), (64, 1, 16, 16), generator=torch.Generator().manual_seed(0), callback=record)
    for t in (899, 499, 199, 49, 0):
        assert abs(stds[t] / (d.alpha_bar[t] * c ** 2 + 1 - d.alpha_bar[t]).sqrt() - 1) < 0.02, t
    assert abs(x.std() / c - 1) < 0.02


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_dpm_solver_is_second_order_on_gaussian_data(schedule):
    # data ~ N(0, c^2): the exact noise predictor and the exact ODE solution are known in closed form
    d, c = Diffusion(1000, schedule), 0.25
    exact_eps = gaussian_eps(d, c)
    z = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    exact = c * z / (d.alpha_bar[-1] * c ** 2 + 1 - d.alpha_bar[-1]).sqrt()  # the ODE keeps x / std(x_t)
    error = lambda method, steps: (d.sample(exact_eps, z.shape, method, steps,
                                            generator=torch.Generator().manual_seed(0)) - exact).pow(2).mean()
    assert error("dpm", 40) < error("dpm", 20) / 8  # MSE of a 2nd-order solver: 16x less for half the step
    assert error("dpm", 20) < error("ddim", 20) and error("dpm", 40) < error("ddim", 40)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpm_solver_and_its_sde_form_equal_diffusers_given_the_same_noise(order, eta):
    from diffusers import DPMSolverMultistepScheduler
    d, steps, shape = Diffusion(1000, clip=False), 20, (4, 1, 8, 8)
    model = gaussian_eps(d, 0.5)
    ours = d.dpm_sample(model, shape, steps, eta, order=order, generator=torch.Generator().manual_seed(0))
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            algorithm_type="sde-dpmsolver++" if eta else "dpmsolver++",
                                            solver_order=order, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == d.timesteps(steps + 1)[:-1]  # the same grid
    g = torch.Generator().manual_seed(0)
    x = randn(shape, g)
    for i, t in enumerate(scheduler.timesteps):
        noise = randn(shape, g) if eta and i + 1 < steps else torch.zeros(shape)  # the last step adds none
        x = scheduler.step(model(x, t.expand(shape[0])), t, x, variance_noise=noise).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


def test_per_image_seeds_do_not_depend_on_the_batch():
    d = Diffusion(20)
    model = Oracle(d, torch.zeros(1, 1, 4, 4))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    full = d.ddpm_sample(model, (4, 1, 4, 4), generator=gens(range(4)))
    part = d.ddpm_sample(model, (2, 1, 4, 4), generator=gens(range(2, 4)))
    assert torch.equal(full[2:], part)


class Affine(torch.nn.Module):
    """A stand-in network whose output depends on the label, to check guidance arithmetic."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.config, self.calls = UNetConfig(1, (8,), (False,), num_classes=num_classes), 0

    def forward(self, x, t, y):
        self.calls += 1
        return 0.1 * x + 0.01 * y.float().view(-1, 1, 1, 1)


def test_guidance_mixes_conditional_and_unconditional_in_one_forward():
    d, model = Diffusion(20), Affine()
    x, y, null = torch.randn(2, 1, 4, 4), torch.tensor([0, 2]), torch.tensor([3, 3])
    cond = d.predict(model, x, 7, y, 1.0)[0]
    uncond = d.predict(model, x, 7, null, 1.0)[0]
    assert torch.allclose(d.predict(model, x, 7, y, 0.0)[0], uncond)
    model.calls = 0
    guided = d.predict(model, x, 7, y, 3.0)[0]
    assert model.calls == 1 and not torch.allclose(guided, cond)
    model.calls = 0
    d.ddim_sample(model, (2, 1, 4, 4), 5, y=y, guidance=2.0)
    assert model.calls == 5


# ---------------------------------------------------------------- datasets in their real on-disk formats

def test_mnist5k_is_28px_digits_with_labels():
    ds = data.load_dataset("mnist5k")
    x, y = ds[0]
    assert len(ds) == 5000 and x.shape == (1, 28, 28) and ds.num_classes == 10
    assert x.min() == -1 and x.max() <= 1 and 0 <= int(y) < 10
    assert data.load_dataset("mnist5k", image_size=32)[0][0].shape == (1, 32, 32)


def test_cifar10_loader_reads_the_python_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [i % 10, 1, 2, 3],
                 "batch_label": f"training batch {i} of 5", "filenames": [f"{i}_{j}.png" for j in range(4)]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    ds = data.load_dataset("cifar10", str(tmp_path))
    x, y = ds[4]
    assert len(ds) == 20 and x.shape == (3, 32, 32) and int(y) == 2 and ds.hflip
    assert x[0, 0, 0].item() == pytest.approx(batch_pixel(tmp_path, 2, 0) / 127.5 - 1)


def batch_pixel(root, batch, index):
    with open(root / "cifar-10-batches-py" / f"data_batch_{batch}", "rb") as f:
        return int(pickle.load(f, encoding="latin1")["data"][index][0])


def test_mnist_loader_reads_torchvision_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    for split in ("train", "t10k"):  # torchvision wants all four files there
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([2051, 3, 28, 28], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([2049, 3], dtype=">i4").tobytes() + bytes([7, 1, 4]))
    ds = data.load_dataset("mnist", str(tmp_path), image_size=32)
    x, y = ds[0]
    assert len(ds) == 3 and x.shape == (1, 32, 32) and int(y) == 7
    assert x[0, 2, 2].item() == pytest.approx(images[0, 0, 0] / 127.5 - 1) and x[0, 0, 0] == -1  # padded


def write_images(folder, names, size=(178, 218)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i % 256, 100, 200)).save(folder / name)


def test_celeba_loader_uses_the_official_train_split(tmp_path):
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    write_images(tmp_path / "img_align_celeba", names)
    (tmp_path / "img_align_celeba" / "000000.jpg").write_bytes(b"not a jpeg")  # a test-split image
    (tmp_path / "list_eval_partition.txt").write_text("000000.jpg 2\n" +
        "".join(f"{n} {0 if i < 4 else 1}\n" for i, n in enumerate(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # images outside the split are never opened
        ds = data.load_dataset("celeba", str(tmp_path))
        x, _ = ds[0]
    assert len(ds) == 4 and x.shape == (3, 64, 64) and ds.num_classes == 0
    assert torch.equal(x, ds.load(str(tmp_path / "img_align_celeba" / "000001.jpg")))


@pytest.mark.parametrize("images, partition", [
    ("data/celeba/img_align_celeba", "data/celeba/list_eval_partition.txt"),  # torchvision's
    ("data/img_align_celeba", None),  # the official zip, unpacked into data/
    ("data/img_align_celeba/img_align_celeba", "data/list_eval_partition.csv"),  # Kaggle's
])
def test_celeba_is_found_under_data_as_typed(tmp_path, images, partition):
    names = [f"{i:06d}.jpg" for i in range(1, 12)]
    write_images(tmp_path / images, names)
    if partition:  # the last image is in the test split
        rows = [f"{n}{',' if partition.endswith('csv') else ' '}{2 if n == names[-1] else 0}\n" for n in names]
        (tmp_path / partition).write_text(("image_id,partition\n" if partition.endswith("csv") else "") + "".join(rows))
    argv = [*TINY, "--image-size", "16", "--max-steps", "1", "--sample-every", "100"]
    train.main(["--dataset", "celeba", *argv])  # in the working folder, where data/ is
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 1
    ds = data.load_dataset("celeba", image_size=16)
    assert len(ds) == (10 if partition else 11) and ds.files[0] == os.path.join(images, names[0])
    os.rename(tmp_path / "data", tmp_path / "elsewhere")  # the same layouts inside --data-dir
    assert len(data.load_dataset("celeba", str(tmp_path / "elsewhere"), image_size=16)) == len(ds)


def test_celeba_without_data_or_download_is_one_line(tmp_path):
    no_network = {**os.environ, **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                                                     "https_proxy")}, "NO_PROXY": "", "no_proxy": ""}
    result = subprocess.run([sys.executable, SCRIPT["train.py"], "--dataset", "celeba"], capture_output=True,
                            text=True, timeout=120, env=no_network)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: no img_align_celeba/ in 'data' or "
                                                                 "'data/celeba', and torchvision could not download")
    for expected in ("https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html", "Kaggle", "--data-dir"):
        assert expected in message


def test_folder_loader_labels_subfolders_and_skips_corrupt_images(tmp_path):
    write_images(tmp_path / "cats", ["a.png", "b.jpg"], (40, 30))
    write_images(tmp_path / "dogs" / "deep", ["c.png"], (20, 20))
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = data.load_dataset("folder", str(tmp_path), image_size=16, class_labels=True)
    assert ds.num_classes == 2 and len(ds) == 4
    labels = [ds[i][1] for i in range(4) if "broken" not in ds.files[i]]
    assert sorted(labels) == [0, 0, 1]
    broken = ds.files.index(str(tmp_path / "dogs" / "broken.jpg"))
    with pytest.warns(UserWarning, match="broken.jpg"):
        x, _ = ds[broken]
    assert x.shape == (3, 16, 16)
    Image.MAX_IMAGE_PIXELS, limit = 500, Image.MAX_IMAGE_PIXELS  # 40x30 images are now "bombs"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, _ = ds[ds.files.index(str(tmp_path / "cats" / "a.png"))]  # a.png, b.jpg, broken.jpg skipped
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert "decompression bomb" in str(caught[0].message) and x.shape == (3, 16, 16)


def test_an_unreadable_image_is_warned_of_once_across_workers_and_epochs(tmp_path):
    write_images(tmp_path / "imgs", [f"{i:02d}.png" for i in range(35)], (8, 8))
    (tmp_path / "imgs" / "05b.png").write_bytes(b"not a png")  # 36 files: 9 batches of 4 per epoch
    argv = [SCRIPT["train.py"], *TINY, "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "8",
            "--batch-size", "4", "--max-steps", "36", "--workers", "2", "--out-dir", str(tmp_path / "o")]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("skipping unreadable image") == 1, result.stderr  # 4 epochs, 2 workers


# ---------------------------------------------------------------- training and sampling end to end

def test_train_then_sample_writes_a_grid_png(tmp_path):
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--max-steps", "3", *TINY])
    assert (out / "ckpt.pt").exists() and (out / "ema_fp16.pt").exists()
    assert (out / "samples" / "step_0000003.png").exists()
    path = sample.main(["--ckpt", str(out / "ckpt.pt"), "--nrow", "3", "--steps", "4", "--out", str(tmp_path / "g.png")])
    with Image.open(path) as img:
        assert img.size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)  # 3 images of 28 px, 2 px padding
    ddpm = sample.main(["--ckpt", str(out / "ema_fp16.pt"), "--method", "ddpm", "--nrow", "2",
                        "--out", str(tmp_path / "d.png")])
    assert Image.open(ddpm).size == (2 * 28 + 3 * 2,) * 2


def test_same_seed_same_images(tmp_path):
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--max-steps", "2", *TINY])
    a = sample.main(["--ckpt", str(out / "ckpt.pt"), "--nrow", "2", "--steps", "3", "--out", str(tmp_path / "a.png")])
    b = sample.main(["--ckpt", str(out / "ckpt.pt"), "--nrow", "2", "--steps", "3", "--out", str(tmp_path / "b.png")])
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_bfloat16_autocast_trains_on_cpu(tmp_path):
    model, _ = train.main(["--out-dir", str(tmp_path), "--max-steps", "2", "--dtype", "bfloat16", *TINY])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def state_of(path):
    ckpt = load_checkpoint(path)
    return ckpt["model"], ckpt["ema"], ckpt["optimizer"]["state"], ckpt["step"]


def assert_same_state(a, b):
    for x, y in zip(a[:3], b[:3]):
        for k in x:
            if isinstance(x[k], dict):
                for kk in x[k]:
                    assert torch.equal(torch.as_tensor(x[k][kk]), torch.as_tensor(y[k][kk])), (k, kk)
            else:
                assert torch.equal(x[k], y[k]), k
    assert a[3] == b[3]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    # 5000 digits / batch 8: step 6 is mid-epoch; dropout on so that its RNG matters too.
    # No LR decay: its schedule reads --max-steps, which differs between the two halves here.
    common = [*TINY, "--dropout", "0.1", "--save-every", "100", "--sample-every", "100", "--no-lr-decay"]
    train.main(["--out-dir", str(tmp_path / "straight"), "--max-steps", "12", *common])
    train.main(["--out-dir", str(tmp_path / "split"), "--max-steps", "6", *common])
    train.main(["--out-dir", str(tmp_path / "split"), "--max-steps", "12", "--resume"])
    assert_same_state(state_of(tmp_path / "straight" / "ckpt.pt"), state_of(tmp_path / "split" / "ckpt.pt"))


def scale_losses(monkeypatch, factor):
    """Multiply the n-th training loss by factor(n); returns the list that counts the losses."""
    real_loss, calls = train.Diffusion.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        losses, t = real_loss(self, *args, **kwargs)
        return losses * factor(len(calls)), t
    monkeypatch.setattr(train.Diffusion, "loss", loss)
    return calls


def test_resume_writes_into_the_folder_it_resumed_from(tmp_path, monkeypatch):
    train.main(["--out-dir", str(tmp_path / "exp1"), *TINY, "--max-steps", "2"])
    (tmp_path / "exp1").rename(tmp_path / "out")  # the default --out-dir
    monkeypatch.chdir(tmp_path)
    train.main(["--resume", "--max-steps", "3", "--sample-every", "3"])
    assert not (tmp_path / "exp1").exists()
    assert (tmp_path / "out" / "ema_fp16.pt").exists() and (tmp_path / "out" / "samples" / "step_0000003.png").exists()


def test_resume_can_switch_between_fp32_and_fp16(tmp_path):
    # an fp32 checkpoint holds an empty gradient-scaler state, which fp16's scaler cannot load
    common = ["--out-dir", str(tmp_path), *TINY, "--sample-every", "100"]
    train.main([*common, "--max-steps", "2"])
    train.main([*common, "--max-steps", "3", "--dtype", "float16", "--resume"])
    assert load_checkpoint(tmp_path / "ckpt.pt")["scaler"]["scale"] > 0
    train.main([*common, "--max-steps", "4", "--dtype", "float32", "--resume"])
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 4


def test_resume_after_a_skipped_update_is_still_bitwise_identical(tmp_path, monkeypatch):
    # the 3rd loss of each run is NaN: its update is skipped, and the step still consumes its
    # batch, so step i trains on batch i, which is where a resumed run takes up the data
    calls = scale_losses(monkeypatch, lambda n: float("nan") if n == 3 else 1.0)
    common = [*TINY, "--save-every", "100", "--sample-every", "100", "--no-lr-decay"]
    train.main(["--out-dir", str(tmp_path / "straight"), "--max-steps", "8", *common])
    calls.clear()
    train.main(["--out-dir", str(tmp_path / "split"), "--max-steps", "4", *common])
    train.main(["--out-dir", str(tmp_path / "split"), "--max-steps", "8", "--resume"])
    assert len(calls) == 4 + 4  # a skipped update is a step: one before the split, none after
    assert_same_state(state_of(tmp_path / "straight" / "ckpt.pt"), state_of(tmp_path / "split" / "ckpt.pt"))


class PidDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):  # the index, and the process that loaded it
        return torch.tensor(i), os.getpid()


def test_batches_go_on_epoch_after_epoch_through_the_same_workers():
    # 10 items / batch 4: 2 batches per epoch; from step 1, epoch 0's second batch, then epochs 1 and 2
    stream = data.batches(PidDataset(), 4, 3, 0, 1, 1, torch.device("cpu"), workers=2)
    got = [next(stream) for _ in range(5)]
    stream.close()
    sampler = torch.utils.data.DistributedSampler(PidDataset(), 1, 0, shuffle=True, seed=3, drop_last=True)
    order = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order += list(sampler)[:8]
    assert [x.tolist() for x, _ in got] == [order[i:i + 4] for i in range(4, 24, 4)]
    pids = {pid for _, y in got for pid in y.tolist()}
    assert len(pids) <= 2 and os.getpid() not in pids  # two workers for the whole run, not two per epoch


def torchrun_two_ranks(tmp_path, on_loss, argv, patch=""):
    """train.main under torchrun with 2 processes; on_loss(rank, n) runs at each rank's n-th loss
    and returns its factor, and `patch` (code) runs before train.main. Each rank saves its final
    weights as rank<N>.pt, or its exit status as exit<N>."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, signal, sys, time, torch\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import train\n"
        "real_loss, calls, rank = train.Diffusion.loss, [], int(os.environ['RANK'])\n"
        f"on_loss = {on_loss}\n"
        "def loss(self, *args, **kwargs):\n"
        "    calls.append(1)\n"
        "    losses, t = real_loss(self, *args, **kwargs)\n"
        "    return losses * on_loss(rank, len(calls)), t\n"
        "train.Diffusion.loss = loss\n"
        f"{patch}"
        "try:\n"
        "    model, ema = train.main(sys.argv[1:])\n"
        "except SystemExit as e:\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'exit%s' % rank), 'w').write(str(e.code))\n"
        "    raise\n"
        f"torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, 'rank%s.pt' % rank))\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "--out-dir", str(tmp_path / "out"), *TINY, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("device, dtype", [("cpu", "float32"), ("cpu", "float16"), pytest.param(
    "cuda", "auto", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"))])
def test_ddp_two_processes_end_with_identical_weights(tmp_path, device, dtype):
    # rank 0 alone gets an inf loss at its 3rd step: both ranks must skip that update together
    # (in fp16 the scaler hides the inf gradient, so only rank 0 sees anything wrong by itself)
    on_loss = "lambda rank, n: float('inf') if rank == 0 and n == 3 else 1.0"
    result = torchrun_two_ranks(tmp_path, on_loss, ["--max-steps", "4", "--dropout", "0.1", "--device", device,
                                                    "--dtype", dtype])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("step 4/4") == 1  # only rank 0 logs
    assert result.stderr.count("steps 3-3: 1 update(s) skipped") == 1  # rank 0 logs it
    a, b = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = load_checkpoint(tmp_path / "out" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], saved[k]) for k in a)  # no "module." prefixes


@pytest.mark.slow
def test_ddp_rank_0_loads_the_data_before_the_others_start(tmp_path):
    # cifar10 and mnist download into one folder: two processes writing it at once corrupt it
    done = str(tmp_path / "rank0_loaded")
    patch = ("real_load = train.load_dataset\n"
             "def load_dataset(*args):\n"
             "    if rank == 0:\n"
             "        time.sleep(1)\n"
             f"        open({done!r}, 'w').close()\n"
             f"    elif not os.path.exists({done!r}):\n"
             "        sys.exit('rank 1 loads the data while rank 0 is still loading it')\n"
             "    return real_load(*args)\n"
             "train.load_dataset = load_dataset\n")
    result = torchrun_two_ranks(tmp_path, "lambda rank, n: 1.0", ["--max-steps", "1"], patch)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_ddp_a_signal_to_one_rank_stops_both_and_saves(tmp_path):
    # rank 1 alone gets SIGTERM during its 2nd step (as from a scheduler that signals one process)
    on_loss = "lambda rank, n: os.kill(os.getpid(), signal.SIGTERM) or 1.0 if rank == 1 and n == 2 else 1.0"
    result = torchrun_two_ranks(tmp_path, on_loss, ["--max-steps", "100", "--save-every", "100"])
    assert [(tmp_path / f"exit{r}").read_text() for r in (0, 1)] == ["143", "143"]  # 128 + SIGTERM
    assert "done" not in result.stdout
    assert "saved" in result.stderr and load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2
    assert not (tmp_path / "out" / "ema_fp16.pt").exists()


# ---------------------------------------------------------------- never losing work

def test_failed_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, capsys):
    train.main(["--out-dir", str(tmp_path), "--max-steps", "2", *TINY])

    def half_write(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", half_write)
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--max-steps", "4", "--resume"])
    assert "No space left" in message and "previous checkpoint is intact" in message
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2
    assert not (tmp_path / "ckpt.pt.tmp").exists()


def test_failed_first_save_claims_no_previous_checkpoint(tmp_path, monkeypatch, capsys):
    def fail(obj, f):  # what torch.save raises when the disk fills up under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 995840 vs 995728")
    monkeypatch.setattr(train.torch, "save", fail)
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--max-steps", "1", *TINY])
    assert "is the disk full?" in message and "intact" not in message
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "ckpt.pt.tmp").exists()


def test_killed_save_leaves_a_loadable_checkpoint(tmp_path):
    # SIGKILL a run at random moments while it saves every step: ckpt.pt always loads
    args = [sys.executable, SCRIPT["train.py"], "--out-dir", str(tmp_path), "--max-steps", "1000",
            *TINY, "--save-every", "1", "--sample-every", "1000", "--log-every", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "ckpt.prev.pt").exists(), proc)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    step = load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert step >= 2
    train.main(["--out-dir", str(tmp_path), "--max-steps", str(step + 1), "--resume", "--sample-every", "1000"])
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == step + 1


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "training exited early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigint_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    args = [sys.executable, SCRIPT["train.py"], "--out-dir", str(tmp_path), "--max-steps", "100000",
            *TINY, "--save-every", "100000", "--sample-every", "100000", "--workers", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert "step 1/" in proc.stdout.readline() + proc.stdout.readline()
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to the DataLoader workers too
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err
    assert "resume with --resume" in err and err.count("saving after this step") == 1
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] >= 1


def test_nonfinite_loss_is_skipped_counted_and_stops_without_overwriting(tmp_path, monkeypatch, capsys):
    train.main(["--out-dir", str(tmp_path), "--max-steps", "2", *TINY])
    calls = scale_losses(monkeypatch, lambda n: 1.0 if n == 1 else float("nan"))
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--max-steps", "50", "--resume",
                                                  "--max-bad-steps", "3", "--save-every", "1"])
    assert "3 steps in a row" in message and "from step 4" in message
    assert capsys.readouterr().err.count("1 update(s) skipped") == 2  # at steps 4 and 5; step 6 stops
    assert len(calls) == 4
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")  # step 5's save: step 3's weights, the bad ones skipped
    good = load_checkpoint(tmp_path / "ckpt.prev.pt")  # step 4's
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.equal(v, good["model"][k]) for k, v in ckpt["model"].items())


def test_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"model": Evil()}, tmp_path / "ckpt.pt")
    message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "ckpt.pt")])
    assert "not a safe, readable checkpoint" in message
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--resume", *TINY])
    assert "not a safe, readable checkpoint" in message
    assert not marker.exists()


# ---------------------------------------------------------------- bad input: one line, no traceback

def one_line_error(capsys, main, argv):
    """Run main(argv); it must exit non-zero with one line on stderr (or in SystemExit)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code  # sys.exit("error: ...") carries it; argparse prints it
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert code != 0 and message.strip() and "\n" not in message.strip(), message
    return message.strip()


def folder_contents(folder):
    return {path: open(path, "rb").read() for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True))
            if os.path.isfile(path)}


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A 1-step TINY run, trained once for the session: tests only read its folder (one that runs
    train.py on it takes trained_copy), and that they left it as it was is checked at the end."""
    out = tmp_path_factory.mktemp("trained")
    cwd = os.getcwd()
    os.chdir(out)  # as in every test: nothing of the clone's is read or written
    try:
        train.main(["--out-dir", str(out), "--max-steps", "1", *TINY])
    finally:
        os.chdir(cwd)
    before = folder_contents(out)
    yield out
    assert folder_contents(out) == before, "a test changed the shared `trained` folder: give it trained_copy"


@pytest.fixture
def trained_copy(trained, tmp_path_factory):
    """A copy of `trained` of the test's own, for one that runs train.py on its folder."""
    return shutil.copytree(trained, tmp_path_factory.mktemp("trained_copy") / "out")


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "celeba", "--data-dir", "/nonexistent/celeba"], "no img_align_celeba/ in '/nonexistent/celeba'"),
    (["--dataset", "folder"], "no --data-dir given: give --data-dir, a folder of images"),
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--dataset", "mnist5k", "--image-size", "26"], "must be 28, 30, 32"),
    (["--channels", "8,16,16", "--attention", "0,0,0", "--image-size", "30"], "cannot be halved 2 times"),
    (["--channels", "8,16", "--attention", "0"], "one entry per level"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--channels", "0,16", "--attention", "0,0"], "channel width 0 must be a multiple of 4"),
    (["--channels", "224", "--attention", "1"], "224 does not split into 3 attention heads"),
    (["--channels", "8,224", "--attention", "0,0"], "join into 232 channels, which GroupNorm's 32"),
    (["--num-res", "0"], "num_res must be at least 1"),
    (["--time-emb-dim", "3"], "time_emb_dim must be even"),
    (["--attention", "0,0,2"], "use 0 or 1 per level"),
    (["--grad-clip", "-1"], "--grad-clip must be above 0"),
    (["--ema-decay", "2"], "--ema-decay must be at least 0 and below 1"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--min-snr", "nan"], "--min-snr must be 0 or more"),
    (["--max-bad-steps", "0"], "--max-bad-steps must be at least 1"),
    (["--data-dir", "my_images"], "--data-dir has no use with the embedded mnist5k"),
    (["--device", "bogus"], "unknown --device 'bogus'"),
    (["--device", "cuda:99"], "this machine has no such device"),
    (["--timesteps", "1"], "--timesteps must be at least 2"),
    (["--batch-size", "100000", "--channels", "8", "--attention", "0"], "too few for --batch-size"),
])
def test_bad_training_input_is_one_line(capsys, tmp_path, argv, expected):
    assert expected in one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--device", "cpu", *argv])


def test_training_grids_are_what_sample_py_draws_by_default(tmp_path):
    train.main(["--out-dir", str(tmp_path), "--max-steps", "2", *TINY])
    grid = sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--nrow", "4", "--out", str(tmp_path / "g.png")])
    watched = np.asarray(Image.open(tmp_path / "samples" / "step_0000002.png")).astype(int)
    assert np.abs(watched - np.asarray(Image.open(grid))).max() <= 1  # (rounded to uint8 in two ways)


def test_empty_or_imageless_folders_are_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    for folder in ("empty", "texts"):
        argv = ["--dataset", "folder", "--data-dir", str(tmp_path / folder), "--out-dir", str(tmp_path / "o")]
        assert "no images" in one_line_error(capsys, train.main, argv)
    (tmp_path / "corrupt").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "corrupt" / name).write_bytes(b"\x89PNG not really")
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "corrupt"), "--out-dir", str(tmp_path / "o")]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert "no readable images" in one_line_error(capsys, train.main, argv)
    (tmp_path / "celeba").mkdir()
    argv = ["--dataset", "celeba", "--data-dir", str(tmp_path / "celeba"), "--out-dir", str(tmp_path / "o")]
    assert "img_align_celeba" in one_line_error(capsys, train.main, argv)


def test_one_gpu_for_all_torchrun_processes_is_one_line(capsys, monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    message = one_line_error(capsys, train.main, [*TINY, "--device", "cuda:0"])
    assert "would put every torchrun process on one GPU" in message


def test_a_gpu_is_named_by_its_index(monkeypatch):
    """torch.cuda.set_device refuses a bare "cuda": setup() picks GPU 0, or LOCAL_RANK's under torchrun.
    Two GPUs are pretended through the project's own seams; nothing of torch's is patched."""
    monkeypatch.setattr(common, "gpus", lambda: 2)
    monkeypatch.setattr(common, "use_gpu", lambda device: chosen.append(device))
    for local_rank, device, expected in ((None, "auto", "cuda:0"), (None, "cuda", "cuda:0"), ("1", "cuda", "cuda:1")):
        if local_rank:
            monkeypatch.setenv("LOCAL_RANK", local_rank)
        chosen = []
        assert common.setup(device)[2] == torch.device(expected)
        assert chosen == [torch.device(expected)]


def test_unwritable_out_dir_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    argv = ["--out-dir", str(tmp_path / "file" / "out"), *TINY]
    assert "cannot write to --out-dir" in one_line_error(capsys, train.main, argv)


def test_resume_errors_are_one_line(capsys, tmp_path, trained_copy):
    trained = trained_copy  # train.py runs on its folder (and must leave it as it was)
    assert "no checkpoint at" in one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--resume"])
    before = (trained / "ckpt.pt").read_bytes()  # a forgotten --resume must not overwrite a run
    message = one_line_error(capsys, train.main, ["--out-dir", str(trained), *TINY])
    assert "ckpt.pt exists: add --resume" in message and (trained / "ckpt.pt").read_bytes() == before
    message = one_line_error(capsys, train.main, ["--out-dir", str(trained), "--resume", "--max-steps", "1"])
    assert "at step 1, and --max-steps is 1: nothing to train" in message
    ckpt = load_checkpoint(trained / "ckpt.pt")  # as another version of train.py might write it
    (tmp_path / "old").mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "rng"}, tmp_path / "old" / "ckpt.pt")
    argv = ["--out-dir", str(tmp_path / "old"), "--resume", "--max-steps", "2"]
    assert "does not fit this train.py ('rng')" in one_line_error(capsys, train.main, argv)
    argv = ["--out-dir", str(trained), "--resume", "--channels", "8,32", "--max-steps", "2"]
    assert "channels 8,16 there, 8,32 here" in one_line_error(capsys, train.main, argv)
    write_images(tmp_path / "rgb", ["a.png", "b.png"], (28, 28))
    argv = ["--out-dir", str(trained), "--resume", "--max-steps", "2", "--dataset", "folder",
            "--data-dir", str(tmp_path / "rgb")]
    assert "trained otherwise (in_channels 1 there, 3 here" in one_line_error(capsys, train.main, argv)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "ckpt.pt").write_bytes((trained / "ema_fp16.pt").read_bytes())
    argv = ["--out-dir", str(tmp_path / "export"), "--resume"]
    assert "holds only EMA weights" in one_line_error(capsys, train.main, argv)
    truncated = tmp_path / "ckpt.pt"
    truncated.write_bytes((trained / "ckpt.pt").read_bytes()[:5000])
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), "--resume"])
    assert "not a safe, readable checkpoint" in message


@pytest.mark.parametrize("argv, expected", [
    (["--label", "3"], "--label needs a class-conditional model"),
    (["--nrow", "0"], "--nrow must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "-3"], "--steps must be at least 1"),
    (["--steps", "21"], "--steps 21 is more than --method dpm can take with the model's T=20 (at most 19)"),
    (["--method", "ddpm", "--steps", "10"], "--method ddpm takes every step (all T)"),
    (["--eta", "1.5"], "--eta must be between 0 and 1"),
    (["--eta", "-0.5"], "--eta must be between 0 and 1"),
    (["--eta", "nan"], "--eta must be between 0 and 1"),
    (["--label", "0", "--guidance", "nan"], "--guidance must be a finite number"),
    (["--method", "ddpm", "--eta", "0.5"], "--method ddpm takes every step (all T), with eta 1"),
    (["--method", "ddpm", "--spacing", "logsnr"], "--method ddpm takes every step (all T), with eta 1"),
    (["--method", "ddim", "--variance", "large"], "--variance applies to --method ddpm"),
    (["--spacing", "cubic"], "invalid choice: 'cubic'"),
    (["--variance", "huge"], "invalid choice: 'huge'"),
    (["--guidance", "2"], "--guidance needs --label"),
    (["--num-samples", "3"], "--num-samples needs --npz and/or --png-dir"),
    (["--first", "5"], "--first need --num-samples"),
    (["--num-samples", "2", "--npz", "x.npz", "--out", "g.png"], "drop them with --num-samples"),
    (["--num-samples", "2", "--npz", "."], "is a folder: give a file name"),
    (["--out", "grid.xyz"], "use an image file name"),
    (["--out", "grid.psd"], "use an image file name"),  # a format PIL reads but cannot write
    (["--gif", "denoise.png"], "must end in .gif"),
    (["--method", "dpm", "--steps", "20"], "--steps 20 is more than --method dpm can take with the model's T=20 (at most 19)"),
    (["--no-ema", "--ckpt", "EXPORT"], "holds only EMA weights"),
])
def test_bad_sampling_input_is_one_line(capsys, trained, argv, expected):
    argv = [str(trained / "ema_fp16.pt") if a == "EXPORT" else a for a in argv]
    ckpt = [] if "--ckpt" in argv else ["--ckpt", str(trained / "ckpt.pt")]
    assert expected in one_line_error(capsys, sample.main, ckpt + argv)


def test_sampling_checks_where_it_writes_before_it_samples(capsys, tmp_path, trained, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: pytest.fail("sampled before the check"))
    (tmp_path / "file").write_text("")
    ckpt = ["--ckpt", str(trained / "ckpt.pt")]
    for argv in (["--out", str(tmp_path / "file" / "g.png")], ["--gif", str(tmp_path / "file" / "d.gif")],
                 ["--num-samples", "2", "--npz", str(tmp_path / "file" / "s.npz")],
                 ["--num-samples", "2", "--png-dir", str(tmp_path / "file" / "png")]):
        assert f"cannot write to {argv[-2]} {argv[-1]}" in one_line_error(capsys, sample.main, ckpt + argv)
    assert "more than one batch should hold" in one_line_error(capsys, sample.main, ckpt + ["--nrow", "33"])


def test_checkpoints_that_do_not_fit_their_config_are_one_line(capsys, tmp_path, trained):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    extra = {**ckpt, "model_config": {**ckpt["model_config"], "new_option": 1}}  # from another version
    conditional = {**ckpt, "model_config": {**ckpt["model_config"], "num_classes": 10}}  # no label weights
    for i, bad in enumerate((extra, conditional)):
        torch.save(bad, tmp_path / f"{i}.pt")
        message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / f"{i}.pt")])
        assert "weights do not fit its model config" in message


def test_sampling_bad_files_are_one_line(capsys, tmp_path):
    assert "no checkpoint at" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "none.pt")])
    message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path)])
    assert "is a folder without a config.json (nor unet/config.json): give a checkpoint file, e.g." in message
    (tmp_path / "notes.pt").write_text("just some text")
    assert "not a safe, readable checkpoint" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "notes.pt")])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert "not a checkpoint written by train.py" in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "other.pt")])


def test_errors_print_no_traceback_from_the_command_line(tmp_path):
    for argv in ([SCRIPT["train.py"], "--dataset", "folder", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path)],
                 [SCRIPT["sample.py"], "--ckpt", str(tmp_path / "none.pt")]):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------- generation features

def test_class_conditional_training_and_guided_grid_per_class(tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--max-steps", "2", "--class-cond", "--objective", "v", *TINY])
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_config"]["num_classes"] == 10 and ckpt["diffusion"]["objective"] == "v"
    path = sample.main(["--ckpt", str(out / "ckpt.pt"), "--label", "all", "--guidance", "2", "--nrow", "3",
                        "--steps", "2", "--out", str(tmp_path / "classes.png")])
    assert Image.open(path).size == (3 * 28 + 4 * 2, 10 * 28 + 11 * 2)  # one row per class
    for bad in ("10", "-1", "cat"):
        message = one_line_error(capsys, sample.main, ["--ckpt", str(out / "ckpt.pt"), "--label", bad])
        assert "class index 0..9 or a class name (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in message


def test_folder_classes_are_sampled_by_name(tmp_path, capsys):
    write_images(tmp_path / "pets" / "cats", ["a.png", "b.png"], (8, 8))
    write_images(tmp_path / "pets" / "dogs", ["c.png", "d.png"], (8, 8))
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--max-steps", "1", "--dataset", "folder", "--data-dir", str(tmp_path / "pets"),
                "--class-cond", "--image-size", "8", *TINY, "--batch-size", "2"])
    assert load_checkpoint(out / "ema_fp16.pt")["classes"] == ["cats", "dogs"]
    dogs = sample.main(["--ckpt", str(out / "ema_fp16.pt"), "--label", "dogs", "--nrow", "2", "--steps", "2",
                        "--out", str(tmp_path / "dogs.png")])
    one = sample.main(["--ckpt", str(out / "ema_fp16.pt"), "--label", "1", "--nrow", "2", "--steps", "2",
                       "--out", str(tmp_path / "one.png")])
    assert np.array_equal(np.asarray(Image.open(dogs)), np.asarray(Image.open(one)))
    message = one_line_error(capsys, sample.main, ["--ckpt", str(out / "ckpt.pt"), "--label", "cows"])
    assert "a class name (cats, dogs), not 'cows'" in message


def test_gif_has_frames_of_the_grid_size(tmp_path, trained):
    gif = tmp_path / "denoise.gif"
    sample.main(["--ckpt", str(trained / "ckpt.pt"), "--nrow", "2", "--method", "ddpm", "--gif", str(gif),
                 "--out", str(tmp_path / "g.png")])
    with Image.open(gif) as img:
        assert img.n_frames == 20 and img.size == (2 * 28 + 3 * 2,) * 2  # T=20: a frame per step


def test_npz_and_png_export_and_start_gives_the_same_images(tmp_path, trained):
    ckpt = ["--ckpt", str(trained / "ckpt.pt"), "--method", "dpm", "--steps", "3"]
    sample.main([*ckpt, "--num-samples", "5", "--batch-size", "2", "--npz", str(tmp_path / "all.npz"),
                 "--png-dir", str(tmp_path / "png")])
    sample.main([*ckpt, "--num-samples", "2", "--first", "3", "--npz", str(tmp_path / "part.npz")])
    everything, part = np.load(tmp_path / "all.npz"), np.load(tmp_path / "part.npz")
    assert list(everything.keys()) == ["arr_0"]
    assert everything["arr_0"].shape == (5, 28, 28, 1) and everything["arr_0"].dtype == np.uint8
    assert np.array_equal(everything["arr_0"][3:], part["arr_0"])
    assert sorted(os.listdir(tmp_path / "png")) == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000004.png")), everything["arr_0"][4, :, :, 0])


@pytest.mark.slow
def test_torchrun_export_shares_the_images_out_and_matches_one_process(tmp_path, trained):
    args = ["--ckpt", str(trained / "ckpt.pt"), "--method", "dpm", "--steps", "3", "--device", "cpu",
            "--num-samples", "5", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, SCRIPT["sample.py"], *args, "--npz", str(tmp_path / "one.npz")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT["sample.py"], *args, "--npz", str(tmp_path / "two.npz"), "--png-dir", str(tmp_path / "png")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.split() == [str(tmp_path / "two.npz")]  # printed once, by rank 0
    assert np.array_equal(np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"])
    assert sorted(os.listdir(tmp_path / "png")) == [f"{i:06d}.png" for i in range(5)]  # 0-2 rank 0, 3-4 rank 1
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "png", "two.npz"]  # no temporary file left


def test_default_steps_fit_a_model_with_small_T(tmp_path, trained):
    d, model = Diffusion(20), Oracle(Diffusion(20), torch.zeros(1, 1, 4, 4))
    assert d.sample(model, (1, 1, 4, 4), "dpm").shape == (1, 1, 4, 4)  # 19 steps, not 50
    for method in ("ddim", "dpm"):  # 100 and 50 by default; this model has T = 20
        path = sample.main(["--ckpt", str(trained / "ckpt.pt"), "--method", method, "--nrow", "2",
                            "--out", str(tmp_path / f"{method}.png")])
        assert Image.open(path).size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)


def test_interrupted_export_leaves_no_temporary_file(tmp_path, trained, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(sample, "generate", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(trained / "ckpt.pt"), "--num-samples", "4", "--npz", str(tmp_path / "x.npz")])
    assert exit_info.value.code == 130 and os.listdir(tmp_path) == []


def test_interrupted_png_export_says_where_to_go_on(tmp_path, trained, monkeypatch, capsys):
    real_generate = sample.generate

    def generate(diffusion, model, args, indices, label, callback=None):
        if indices[0] >= 4:  # after two batches of two
            raise KeyboardInterrupt
        return real_generate(diffusion, model, args, indices, label, callback)
    monkeypatch.setattr(sample, "generate", generate)
    argv = ["--ckpt", str(trained / "ckpt.pt"), "--steps", "2", "--batch-size", "2", "--num-samples", "6",
            "--first", "1", "--png-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        sample.main(argv)
    assert f"images 1..4 are in {tmp_path}; go on with --first 5 --num-samples 2" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == [f"{i:06d}.png" for i in range(1, 5)]


def size_of(path):
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def test_killed_export_leaves_no_temporary_file(tmp_path, trained):
    npz = tmp_path / "x.npz"
    process = subprocess.Popen([sys.executable, SCRIPT["sample.py"], "--ckpt", str(trained / "ckpt.pt"), "--device", "cpu",
                                "--steps", "2", "--num-samples", "100000", "--npz", str(npz)],
                               stderr=subprocess.PIPE, text=True)
    # the npz is being written: its space is reserved (writable()'s probe of the same name is empty)
    wait_for(lambda: size_of(tmp_path / "x.npz.tmp") > 0, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert "Traceback" not in process.stderr.read() and os.listdir(tmp_path) == []


@pytest.fixture
def full_disk(tmp_path):
    """fill(free) leaves `free` bytes (or all there is) on a real 1 MB filesystem (a tmpfs), in
    which the test writes; mounting one needs root, which CI has: elsewhere these tests are skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")

    def fill(free):
        (disk / "filler").unlink(missing_ok=True)
        with open(disk / "filler", "wb") as f:
            f.write(bytes(max(0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - free)))
        return disk
    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_npz_export_onto_a_full_disk_fails_at_the_start_in_one_line(capsys, trained, full_disk, monkeypatch):
    disk = full_disk(100_000)  # 300 images of 28 x 28 x 1 need 0.24 MB
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: pytest.fail("sampled before the disk was full"))
    message = one_line_error(capsys, sample.main, ["--ckpt", str(trained / "ckpt.pt"), "--num-samples", "300",
                                                   "--npz", str(disk / "s.npz")])
    assert f"could not write {disk / 's.npz'} (it needs 0.2 MB, and 0.1 MB are free)" in message
    assert os.listdir(disk) == ["filler"]


def test_png_export_onto_a_full_disk_says_where_to_go_on(capsys, trained, full_disk):
    disk = full_disk(5 * 4096)  # a tmpfs gives each file a 4 KB page: room for 5 PNGs
    argv = ["--ckpt", str(trained / "ckpt.pt"), "--steps", "2", "--batch-size", "4", "--png-dir", str(disk / "png")]
    message = one_line_error(capsys, sample.main, [*argv, "--first", "10", "--num-samples", "20"])
    written = sorted(os.listdir(disk / "png"))
    assert written == [f"{i:06d}.png" for i in range(10, 10 + len(written))] and 0 < len(written) < 20
    done = 10 + len(written)
    assert f"could not write {disk / 'png' / f'{done:06d}.png'} (No space left on device)" in message
    assert f"images 10..{done - 1} are in {disk / 'png'}; go on with --first {done} --num-samples {30 - done}" in message
    for name in written:
        assert Image.open(disk / "png" / name).size == (28, 28)
    full_disk(1 << 20)  # room again: the command it gave finishes the export
    sample.main([*argv, "--first", str(done), "--num-samples", str(30 - done)])
    assert sorted(os.listdir(disk / "png")) == [f"{i:06d}.png" for i in range(10, 30)]


def test_grid_and_gif_onto_a_full_disk_leave_no_file(capsys, tmp_path, trained, full_disk):
    disk = full_disk(0)
    ckpt = ["--ckpt", str(trained / "ckpt.pt"), "--nrow", "2", "--steps", "2"]
    message = one_line_error(capsys, sample.main, [*ckpt, "--out", str(disk / "grid.png")])
    assert f"could not write {disk / 'grid.png'} (No space left on device)" in message
    message = one_line_error(capsys, sample.main, [*ckpt, "--out", str(tmp_path / "grid.png"), "--gif",
                                                   str(disk / "denoise.gif")])
    assert f"could not write {disk / 'denoise.gif'} (No space left on device)" in message
    assert os.listdir(disk) == ["filler"] and Image.open(tmp_path / "grid.png").size == (2 * 28 + 3 * 2,) * 2


def test_a_corrupt_checkpoint_points_to_the_previous_one(capsys, tmp_path):
    out = tmp_path / "run"
    train.main(["--out-dir", str(out), "--max-steps", "2", "--save-every", "1", *TINY])
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:5000])  # cut short
    message = one_line_error(capsys, train.main, ["--out-dir", str(out), "--resume", "--max-steps", "3"])
    assert f"{out / 'ckpt.pt'} is not a safe, readable checkpoint" in message
    command = f"cp {out / 'ckpt.prev.pt'} {out / 'ckpt.pt'} && python train.py --resume --out-dir {out}"
    assert f"{out / 'ckpt.prev.pt'} (step 1) is readable: resume from it with {command}" in message
    subprocess.run(command.split(" && ")[0].split(), check=True)
    train.main(["--out-dir", str(out), "--resume", "--max-steps", "3"])
    assert load_checkpoint(out / "ckpt.pt")["step"] == 3


def test_the_logged_speed_is_since_the_last_line(tmp_path, monkeypatch, capsys):
    # a line's img/s is (steps since the last line) x batch / (seconds since the last line), read
    # from the log's clock: here a fake one that only each training step moves, by known amounts,
    # so that no machine's speed shows. The first step stalls for 4 s, as compiling does on a GPU:
    # only the first line's speed may show it (since the start, even the 4th line would read at
    # most 32 images / 4 s = 8 img/s)
    seconds = [4, 0, 0.5, 0.25, 0.125, 0.125, 0.25, 0.25]  # of each step; batch 4, a line every 2 steps
    now = [1000.0]

    class Clock:  # the log's `time` (common.RunLog), but for time.time()
        def __getattr__(self, name):
            return getattr(time, name)

        def time(self):
            return now[0]
    real_step, calls = train.train_step, []
    def stalling_step(*args):
        calls.append(1)
        now[0] += seconds[len(calls) - 1]
        return real_step(*args)
    monkeypatch.setattr(common, "time", Clock())
    monkeypatch.setattr(train, "train_step", stalling_step)
    train.main(["--out-dir", str(tmp_path), "--max-steps", "8", "--sample-every", "1000", *TINY,
                "--batch-size", "4", "--log-every", "2"])
    speeds = [float(s) for s in re.findall(r"([\d.]+) img/s", capsys.readouterr().out)]
    assert len(speeds) == 4 and speeds[0] <= 2 and min(speeds[1:]) > 10  # 8 images: over 4 s, then under 0.8 s
    expected = [2 * 4 / (a + b) for a, b in zip(seconds[::2], seconds[1::2])]  # 2, 10.7, 32 and 16 img/s
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["img_per_s"]) for row in rows] == pytest.approx(expected, rel=1e-12)
    assert speeds == [round(v, 1) for v in expected] and len(calls) == 8
    assert float(rows[-1]["minutes"]) == pytest.approx(sum(seconds) / 60, rel=1e-12)  # since the start


def wandb_runs(out):
    """(run id, history rows) of each offline W&B run under out/wandb/, oldest first, read from its
    transaction log (W&B's record format: 32 KB blocks of CRC-framed chunks holding protobufs)."""
    from wandb.proto.wandb_internal_pb2 import Record
    runs = []
    for path in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, chunk, run_id, history = open(path, "rb").read(), 7, b"", None, []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # the rest of a block is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # a whole record, or its last chunk
                record = Record.FromString(chunk)
                chunk = b""
                if record.WhichOneof("record_type") == "run":
                    run_id = record.run.run_id
                elif record.WhichOneof("record_type") == "history":
                    history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
        runs.append((run_id, history))
    return runs


def test_wandb_offline_run_holds_the_logged_values_and_grids_and_a_resume_continues_it(tmp_path):
    argv = [sys.executable, SCRIPT["train.py"], "--out-dir", str(tmp_path / "out"), *TINY, "--log-every", "2",
            "--sample-every", "2", "--wandb", "--wandb-run-name", "tiny"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    first = subprocess.run([*argv, "--max-steps", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = subprocess.run([*argv, "--max-steps", "6", "--resume"], capture_output=True, text=True, timeout=300,
                            env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    (id1, history1), (id2, history2) = wandb_runs(tmp_path / "out")
    assert id1 == id2 == load_checkpoint(tmp_path / "out" / "ckpt.pt")["args"]["wandb_id"]
    with open(tmp_path / "out" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [2, 4, 6]  # one row per log line, the resumed run's appended
    scalars = [h for h in history1 + history2 if "loss" in h]
    images = [h for h in history1 + history2 if "samples/_type" in h]
    assert [h["step"] for h in scalars] == [2, 4, 6] and [h["step"] for h in images] == [2, 4, 6]
    assert all(h["samples/_type"] == "image-file" and h["samples/path"].endswith(".png") for h in images)
    printed = re.findall(r"step (\d+)/\d+ \| loss ([\d.]+) \| lr ([\d.e+-]+) \| ([\d.]+) img/s",
                         first.stdout + second.stdout)
    assert len(printed) == 3
    for row, logged, (step, loss, lr, speed) in zip(rows, scalars, printed):
        assert row["step"] == step and f"{float(row['loss']):.4f}" == loss and f"{float(row['lr']):.2e}" == lr
        assert f"{float(row['img_per_s']):.1f}" == speed and row["skipped"] == "0"
        for key in ("loss", "q0", "q1", "q2", "q3", "lr", "img_per_s", "grad_norm"):
            assert float(row[key]) == logged[key], key
        assert all(0 < float(row[f"q{i}"]) < 2 for i in range(4))


def test_a_run_without_wandb_never_imports_it(tmp_path):
    script = (f"import sys; sys.path.insert(0, {REPO!r}); import train\n"
              f"train.main({['--out-dir', str(tmp_path / 'out'), '--max-steps', '1', *TINY]!r})\n"
              "print('wandb' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "False", result.stderr[-2000:]
    assert (tmp_path / "out" / "log.csv").read_text().startswith("step,loss,q0,q1,q2,q3,lr,img_per_s,grad_norm")


def test_wandb_missing_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import wandb raises ImportError
    message = one_line_error(capsys, train.main, ["--out-dir", str(tmp_path), *TINY, "--wandb"])
    assert "--wandb needs the wandb package: pip install wandb" in message


def test_checkpoint_is_saved_even_when_the_grid_fails(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(train, "save_grid", full_disk)
    with pytest.raises(SystemExit, match="No space left"):
        train.main(["--out-dir", str(tmp_path), "--max-steps", "1", *TINY])
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 1


def test_dpm_solver_20_steps_is_closer_to_the_ode_than_ddim_20(tmp_path):
    # a small network briefly trained (DDIM-20's error is 3.5-7x DPM-Solver++'s from 80 to 600 steps)
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--max-steps", "100", "--channels", "8,16", "--attention", "0,0",
                "--num-res", "1", "--neck-length", "1", "--time-emb-dim", "16", "--batch-size", "16", "--lr", "2e-3",
                "--device", "cpu", "--warmup-steps", "20", "--log-every", "100", "--sample-every", "1000"])
    ckpt = load_checkpoint(out / "ckpt.pt")
    model = UNet(UNetConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema"])
    model.eval()
    d = Diffusion(1000)
    run = lambda method, steps: d.sample(model, (8, 1, 28, 28), method, steps, generator=torch.Generator().manual_seed(0))
    reference = run("ddim", 200)
    dpm_error = (run("dpm", 20) - reference).pow(2).mean().item()
    ddim_error = (run("ddim", 20) - reference).pow(2).mean().item()
    print(f"mean squared difference to DDIM-200: DPM-Solver++ 20 steps {dpm_error:.5f}, DDIM 20 steps {ddim_error:.5f}")
    assert dpm_error < ddim_error


# ---------------------------------------------------------------- sample quality (fid.py)

@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception v3 with random weights, as a --weights file: the real weights are
    a download, which no test makes. Initialised so that the features stay of order 1."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the initial weights
            return super().load_state_dict(state_dict, strict=False)
    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "none.pt")
    torch.manual_seed(0)
    net = Untrained("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "none.pt"))
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=2048 ** -0.5)
    torch.save(net.state_dict(), folder / "inception.pt")
    return str(folder / "inception.pt")


def test_fid_scores_snapshots_against_the_training_set_and_caches_its_statistics(tmp_path, inception_weights,
                                                                                 monkeypatch, capsys):
    write_images(tmp_path / "imgs", [f"{i:02d}.png" for i in range(12)], (20, 20))
    out = tmp_path / "out"
    train.main(["--out-dir", str(out), "--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--image-size",
                "16", *TINY, "--batch-size", "4", "--max-steps", "2", "--keep-every", "1"])
    assert sorted(os.listdir(out / "snapshots")) == ["ema_0000001.pt", "ema_0000002.pt"]
    snapshot = load_checkpoint(out / "snapshots" / "ema_0000001.pt")
    assert snapshot["step"] == 1 and all(v.dtype == torch.float16 for v in snapshot["ema"].values())
    grid = sample.main(["--ckpt", str(out / "snapshots" / "ema_0000001.pt"), "--nrow", "2", "--steps", "2",
                        "--out", str(tmp_path / "g.png")])
    assert Image.open(grid).size == (2 * 16 + 3 * 2,) * 2
    argv = ["--num-samples", "6", "--steps", "2", "--batch-size", "4", "--weights", inception_weights,
            "--cache-dir", str(tmp_path / "stats"), "--device", "cpu"]
    capsys.readouterr()
    rows = fid.main(["--ckpt", str(out / "snapshots" / "*.pt"), *argv])  # a row per snapshot, by step
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" (step ")[1][0] for line in printed] == ["1", "2"] and len(rows) == 2
    assert all(row["n"] == 6 and row["fid"] > 0 and row["is_mean"] >= 1 for row in rows)
    [cache] = os.listdir(tmp_path / "stats")  # folder-<path hash>-16px-weights-<file hash>.npz
    assert cache.startswith("folder-") and "-16px-weights-" in cache
    assert int(np.load(tmp_path / "stats" / cache)["n"]) == 12 and "12 images" in printed[0]
    monkeypatch.setattr(fid, "dataset_images", lambda *args: pytest.fail("the reference was computed again"))
    [again] = fid.main(["--ckpt", str(out / "snapshots" / "ema_0000002.pt"), *argv])
    assert again == rows[1]  # the same seeds, the same cached reference: the same scores


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(tmp_path, inception_weights):
    y, x = np.mgrid[0:16, 0:16]
    images = np.stack([np.stack([(x * 16 + 8 * i) % 256, y * 16, (x + y) * 8 + i] * 1, -1)
                       for i in range(16)]).astype(np.uint8)  # 16 smooth 16 x 16 RGB images
    np.savez(tmp_path / "ref.npz", images)
    (tmp_path / "png").mkdir()
    for i, image in enumerate(images):  # the same images as PNGs, as sample.py --png-dir writes them
        Image.fromarray(image).save(tmp_path / "png" / f"{i:06d}.png")
    noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "noisy.npz", noisy)
    argv = ["--ref", str(tmp_path / "ref.npz"), "--weights", inception_weights, "--device", "cpu"]
    [same] = fid.main(["--png-dir", str(tmp_path / "png"), *argv])
    [noised] = fid.main(["--npz", str(tmp_path / "noisy.npz"), *argv])
    print(f"FID against itself {same['fid']:.2e}, noised (std 20 of 255) {noised['fid']:.3f}")
    assert abs(same["fid"]) < 1e-4 and noised["fid"] > 0.5  # -2e-6 and 1.7 here


def test_fid_bad_input_is_one_line(capsys, tmp_path, trained, inception_weights, monkeypatch):
    weights = ["--weights", inception_weights, "--device", "cpu"]
    np.savez(tmp_path / "flat.npz", np.zeros((4, 28, 28), np.uint8))
    np.savez(tmp_path / "one.npz", np.zeros((1, 28, 28, 1), np.uint8))
    np.savez(tmp_path / "small.npz", np.zeros((4, 16, 16, 1), np.uint8))
    for argv, expected in [
        (["--ckpt", str(tmp_path / "none.pt")], "no checkpoint at"),
        (["--ckpt", str(tmp_path / "*.pt")], "no checkpoint at --ckpt"),
        (["--npz", str(tmp_path / "none.npz"), "--ref", "mnist5k"], "no such file or folder"),
        (["--ckpt", str(trained / "ckpt.pt"), "--ref", str(tmp_path / "none")], "not a dataset (mnist5k, mnist"),
        (["--npz", str(tmp_path / "flat.npz"), "--ref", "mnist5k"], "expected uint8 images N x H x W x C"),
        (["--npz", str(tmp_path / "one.npz"), "--ref", "mnist5k"], "FID needs at least 2 images, found 1"),
        (["--ckpt", str(trained / "ckpt.pt"), "--num-samples", "1"], "--num-samples must be at least 2"),
        (["--ckpt", str(trained / "ckpt.pt"), "--ref", str(tmp_path / "small.npz"), "--steps", "2"],
         "holds 16x16 images, the samples are 28x28"),
        (["--npz", str(tmp_path / "small.npz")], "--npz and --png-dir need --ref"),
        (["--ckpt", str(trained / "ckpt.pt"), "--npz", str(tmp_path / "small.npz")], "give one of --ckpt"),
    ]:
        assert expected in one_line_error(capsys, fid.main, argv + weights), argv
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # no network
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # and no weights downloaded before
    message = one_line_error(capsys, fid.main, ["--ckpt", str(trained / "ckpt.pt"), "--device", "cpu"])
    assert "could not download the Inception weights" in message and "give --weights FILE" in message


# ---------------------------------------------------------------- Ho et al.'s published networks

# the configs of google/ddpm-cifar10-32 and google/ddpm-*-256 (the latter tested at 64 px, to stay fast)
HO_CIFAR10 = dict(_class_name="UNet2DModel", act_fn="silu", attention_head_dim=None, block_out_channels=[128, 256, 256, 256],
                  center_input_sample=False, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, in_channels=3, layers_per_block=2,
                  mid_block_scale_factor=1, norm_eps=1e-06, norm_num_groups=32, out_channels=3, sample_size=32,
                  time_embedding_type="positional", up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
HO_256 = dict(HO_CIFAR10, block_out_channels=[128, 128, 256, 256, 512, 512], sample_size=64,
              down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)


def diffusers_folder(folder, config, variance="fixed_large", weights="safetensors", rename=None, seed=0):
    """A random-weight diffusers UNet2DModel of `config` (and a DDPM scheduler) saved as the hub's
    tools leave it, weights scaled up from its near-zero initialisation; returns the network."""
    from diffusers import DDPMScheduler, UNet2DModel
    torch.manual_seed(seed)
    net = UNet2DModel(**{k: v for k, v in config.items() if k != "_class_name"}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    if weights == "safetensors":
        net.save_pretrained(folder)
    else:  # a .bin, named as diffusers did before 0.14 where `rename` says so
        net.save_config(folder)
        state = {rename(k) if rename else k: v for k, v in net.state_dict().items()}
        torch.save(state, os.path.join(folder, "diffusion_pytorch_model.bin"))
    DDPMScheduler(variance_type=variance, clip_sample=True).save_pretrained(folder)
    return net


@pytest.fixture(scope="module")
def ho_cifar10(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    return folder, diffusers_folder(folder, HO_CIFAR10)


@pytest.mark.parametrize("config", ["cifar10", "256 at 64 px"])
def test_ho_unet_equals_diffusers_on_random_weights_of_each_published_config(tmp_path, config, ho_cifar10):
    folder, reference = ho_cifar10 if config == "cifar10" else (tmp_path, diffusers_folder(tmp_path, HO_256))
    ours = checkpoint.from_pretrained(str(folder)).eval()
    assert isinstance(ours, model.HoUNet)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, *[reference.config.sample_size] * 2, generator=torch.Generator().manual_seed(1))
    for t in (0, 500, 999):
        with torch.no_grad():
            theirs, mine = reference(x, torch.full((2,), t)).sample, ours(x, torch.full((2,), t))
        assert (mine - theirs).abs().max() <= 1e-5 * theirs.abs().max(), t


def test_the_quick_start_trains_the_measured_recipe_and_help_says_so():
    """benchmarks/recipe.md: v-prediction, the cosine schedule and lr 4e-3; full MNIST inherits it."""
    result = subprocess.run([sys.executable, SCRIPT["train.py"], "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    for flag, value in (("--objective {eps,v,x0}", "v"), ("--schedule {linear,cosine}", "cosine"), ("--lr LR", "0.004"),
                        ("--batch-size BATCH_SIZE", "64"), ("--max-steps MAX_STEPS", "2000")):
        assert re.search(re.escape(flag) + r" (?:(?!--).)*?\(default: " + re.escape(value) + r"\)", shown), flag
    assert "mnist5k: --channels 32,64,64" in shown and "--objective v --schedule cosine --batch-size 64 --lr 0.004" in shown
    for dataset in ("mnist5k", "mnist"):
        args = train.parse_args(["--dataset", dataset])
        assert (args.objective, args.schedule, args.lr, args.min_snr) == ("v", "cosine", 4e-3, 0.0)


def test_the_ho_cifar10_preset_is_their_35_7m_network_and_ours_keep_their_size():
    sizes = {name: sum(p.numel() for p in model.build_unet(train.unet_config(train.parse_args(
        ["--preset" if name.startswith("ho") else "--dataset", name]), 3)).parameters()) for name in
        ("ho-cifar10", "cifar10", "celeba")}
    assert sizes == {"ho-cifar10": 35_746_307, "cifar10": 18_663_107, "celeba": 95_257_155}  # as before HoUNet
    args = train.parse_args(["--preset", "ho-cifar10"])
    assert (args.dataset, args.layout, args.dropout, args.lr, args.batch_size, args.warmup_steps, args.variance) == \
        ("cifar10", "ho", 0.1, 2e-4, 128, 5000, "large")


def test_old_attention_names_in_a_bin_load_to_the_same_network(tmp_path, ho_cifar10):
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    rename = lambda key: re.sub(r"to_q|to_k|to_v|to_out\.0", lambda m: old[m.group(0)], key)
    diffusers_folder(tmp_path, HO_CIFAR10, weights="bin", rename=rename)
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    a, b = checkpoint.from_pretrained(str(tmp_path)), checkpoint.from_pretrained(str(ho_cifar10[0]))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_pipeline_folder_loads_with_its_scheduler_settings(tmp_path, ho_cifar10):
    shutil.copytree(ho_cifar10[0], tmp_path / "unet")  # diffusers' pipeline layout: unet/ and scheduler/
    (tmp_path / "scheduler").mkdir()
    shutil.move(tmp_path / "unet" / "scheduler_config.json", tmp_path / "scheduler" / "scheduler_config.json")
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["diffusion"] == {"T": 1000, "schedule": "linear", "objective": "eps", "variance": "large", "clip": True}
    assert ckpt["args"]["image_size"] == 32 and ckpt["model_config"]["layout"] == "ho"


def test_sample_py_on_a_diffusers_folder_draws_what_the_ddim_formula_gives(tmp_path, ho_cifar10):
    folder, net = ho_cifar10
    out = sample.main(["--ckpt", str(folder), "--method", "ddim", "--steps", "3", "--eta", "0", "--nrow", "2",
                       "--seed", "5", "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    grid = np.asarray(Image.open(out))
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
    for i in range(4):  # image i from seed 5 + i, through diffusers' network and eq. 12, x0 clipped
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5 + i))
        for t, s in ((999, 500), (500, 0), (0, None)):
            a, a_s = alpha_bar[t], alpha_bar[s] if s is not None else torch.tensor(1.0)
            with torch.no_grad():
                eps = net(x, torch.tensor([t])).sample
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * (x - a.sqrt() * x0) / (1 - a).sqrt()
        expected = ((x[0] + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 0).numpy()
        row, col = divmod(i, 2)
        drawn = grid[2 + row * 34:2 + row * 34 + 32, 2 + col * 34:2 + col * 34 + 32]
        assert np.abs(drawn.astype(float) - expected).max() <= 1, i


def test_init_from_a_diffusers_folder_fine_tunes_and_writes_ordinary_checkpoints(tmp_path, capsys):
    small = dict(HO_CIFAR10, block_out_channels=[128, 128], layers_per_block=1, sample_size=16,
                 down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    diffusers_folder(tmp_path / "net", small)  # Ho's layout, small enough for a few CPU steps
    write_images(tmp_path / "imgs", [f"{i:02d}.png" for i in range(6)], (40, 40))
    out = tmp_path / "out"
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--init-from", str(tmp_path / "net"),
            "--out-dir", str(out), "--batch-size", "2", "--max-steps", "1", "--device", "cpu", "--sample-every", "100"]
    model_, ema = train.main(argv)
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["model_config"]["layout"] == "ho" and ckpt["args"]["image_size"] == 16  # the network's own
    assert ckpt["diffusion"]["variance"] == "large"
    start = checkpoint.from_pretrained(str(tmp_path / "net"))
    moved = max((v - model_.state_dict()[k]).abs().max().item() for k, v in start.state_dict().items())
    assert 0 < moved < 1e-4  # one warm-up step (lr 2e-7) from the published weights, not a fresh init
    train.main(argv[:-4] + ["--max-steps", "2", "--resume"])
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 2
    grid = sample.main(["--ckpt", str(out / "ckpt.pt"), "--steps", "2", "--nrow", "1", "--device", "cpu"])
    assert Image.open(grid).size == (16, 16)
    message = one_line_error(capsys, train.main, ["--init-from", str(tmp_path / "net"), "--channels", "8,16",
                                                  "--out-dir", str(tmp_path / "o2"), "--device", "cpu"])
    assert "--channels is the network's own with --init-from" in message
    message = one_line_error(capsys, train.main, ["--init-from", str(tmp_path / "net"), "--out-dir", str(tmp_path / "o3"),
                                                  "--image-size", "28", "--device", "cpu"])
    assert "is a network for other images (in_channels 3 there, 1 here)" in message


def test_a_bin_that_holds_pickled_code_is_refused_and_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "config.json").write_text(json.dumps(HO_CIFAR10))
    torch.save({"conv_in.weight": Evil()}, tmp_path / "net" / "diffusion_pytorch_model.bin")
    message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "net")])
    assert "diffusion_pytorch_model.bin is not a safe, readable weights file: it holds pickled code" in message
    assert not marker.exists()


@pytest.mark.parametrize("change, expected", [
    (None, "is a folder without a config.json (nor unet/config.json)"),
    (dict(_class_name="UNet2DConditionModel", cross_attention_dim=768), "is a UNet2DConditionModel: only pixel-space"),
    (dict(freq_shift=0, norm_eps=1e-5), "not in Ho et al.'s layout (freq_shift 0, not 1; norm_eps 1e-05, not 1e-06)"),
    (dict(attention_head_dim=32, out_channels=6), "attention_head_dim 32, not None; 3 channels in, 6 out"),
    ("latent", "is a latent diffusion pipeline (it has a vqvae): only pixel-space UNet2DModel networks"),
    (dict(sample_size=36), "image size 36 cannot be halved 3 times"),
])
def test_networks_not_in_ho_layout_are_refused_in_one_line(tmp_path, capsys, change, expected):
    (tmp_path / "net").mkdir()
    if change == "latent":  # a pipeline whose UNet works on an autoencoder's latents
        (tmp_path / "net" / "model_index.json").write_text(json.dumps({"unet": [], "vqvae": [], "scheduler": []}))
        (tmp_path / "net" / "unet").mkdir()
        (tmp_path / "net" / "unet" / "config.json").write_text(json.dumps(HO_CIFAR10))
    elif change is not None:
        (tmp_path / "net" / "config.json").write_text(json.dumps({**HO_CIFAR10, **change}))
    assert expected in one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "net")])


def test_a_hub_name_without_network_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, SCRIPT["sample.py"], "--ckpt", "google/ddpm-cifar10-32"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: could not download google/ddpm-cifar10-32's config.json from the Hugging "
                                    "Face hub (HF_HUB_OFFLINE is set), and it is not in the hub's cache")


def test_a_hub_name_that_does_not_exist_is_one_line(capsys, monkeypatch):
    import huggingface_hub

    def not_found(name, file):  # the hub's 404 for a repository (made without its HTTP response)
        error = huggingface_hub.errors.RepositoryNotFoundError.__new__(huggingface_hub.errors.RepositoryNotFoundError)
        Exception.__init__(error, f"404: {name}")
        raise error
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # else the hub is not asked
    error = one_line_error(capsys, sample.main, ["--ckpt", "nobody/no-such-model"])
    assert "no model nobody/no-such-model on the Hugging Face hub, nor a file or folder" in error


# ---------------------------------------------------------------- editing images (edit.py)

def digit_files(folder):
    """Two real 28 x 28 digits (a 3 and a 7 from mnist5k) as PNGs, and a mask of the lower half."""
    folder.mkdir(exist_ok=True)
    digits = data.load_dataset("mnist5k").images
    for name, i in (("three.png", 1500), ("seven.png", 3500)):
        Image.fromarray(digits[i, 0].numpy()).save(folder / name)
    mask = np.zeros((28, 28), np.uint8)
    mask[14:] = 255  # white: redraw
    Image.fromarray(mask).save(folder / "mask.png")
    return [str(folder / name) for name in ("three.png", "seven.png", "mask.png")]


def tiles(path, n, size=28):
    """The n x n images of a grid PNG (saved as RGB), grey uint8."""
    grid = np.asarray(Image.open(path).convert("L"))
    return [grid[2 + r * (size + 2):2 + r * (size + 2) + size, 2 + c * (size + 2):2 + c * (size + 2) + size]
            for r in range(n) for c in range(n)]


def test_inpainting_keeps_the_known_pixels_exactly_and_redraws_the_rest(tmp_path, trained):
    three, _, mask = digit_files(tmp_path / "in")
    out = edit.main(["--ckpt", str(trained / "ckpt.pt"), "--image", three, "--mask", mask, "--nrow", "2",
                     "--steps", "6", "--jump-length", "2", "--jump-n-sample", "3", "--out", str(tmp_path / "i.png")])
    original = np.asarray(Image.open(three))
    for tile in tiles(out, 2):
        assert np.array_equal(tile[:14], original[:14])  # kept, to the last uint8 level
        assert (tile[14:] != original[14:]).mean() > 0.5  # redrawn


def test_repaint_goes_back_jump_length_steps_jump_n_sample_times():
    d, calls = Diffusion(50), []
    model = Oracle(d, torch.zeros(1, 1, 4, 4))
    d.repaint_sample(model, (1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4), steps=20,
                     jump_length=5, jump_n_sample=3, callback=lambda i, n, x, x0: calls.append(n))
    assert model.calls == len(calls) == calls[0] == 20 + 3 * 2 * 5  # back from 15, 10, 5 (not 0) steps left, twice


def test_variations_move_further_from_the_image_as_strength_grows():
    d, c = Diffusion(1000), 0.5
    image = c * torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    distance = [(d.sample(gaussian_eps(d, c), (16, 1, 16, 16), "ddim", 20, 1.0, x0=image, start=start,
                          generator=torch.Generator().manual_seed(1)) - image).pow(2).mean().item()
                for start in (-1, 29, 99, 199, 999)]  # strength 0, 0.03, 0.1, 0.2, 1
    assert distance[0] == 0 and distance == sorted(distance) and distance[-1] > 10 * distance[1], distance


def test_variations_at_strength_0_give_the_image_back(tmp_path, trained):
    three, _, _ = digit_files(tmp_path / "in")
    out = edit.main(["--ckpt", str(trained / "ckpt.pt"), "--image", three, "--strength", "0", "--nrow", "1",
                     "--out", str(tmp_path / "v.png")])
    assert np.array_equal(np.asarray(Image.open(out).convert("L")), np.asarray(Image.open(three)))  # --nrow 1
    out = edit.main(["--ckpt", str(trained / "ckpt.pt"), "--image", three, "--strength", "0.5", "--nrow", "2",
                     "--steps", "3", "--out", str(tmp_path / "v2.png")])
    assert Image.open(out).size == (2 * 28 + 3 * 2,) * 2


def test_ddim_inversion_round_trip_error_falls_with_more_steps():
    d, c = Diffusion(1000), 0.5
    x0 = c * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    error = lambda steps: (d.ddim_sample(gaussian_eps(d, c), x0.shape, steps, x=d.ddim_invert(gaussian_eps(d, c), x0, steps))
                           - x0).abs().mean()
    assert error(100) < error(10) / 3


def test_slerp_keeps_the_norm_where_lerp_shrinks_it():
    a, b = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    middle = edit.slerp(a, b, 0.5)
    assert abs(middle.norm() / a.norm() - 1) < 0.02 and abs(((a + b) / 2).norm() / a.norm() - 0.71) < 0.03
    assert torch.allclose(edit.slerp(a, b, torch.tensor(0.0)), a, atol=1e-5)
    assert torch.allclose(edit.slerp(a, b, torch.tensor(1.0)), b, atol=1e-5)


def test_interpolation_writes_a_strip_and_a_gif_and_reports_the_round_trip(tmp_path, trained, capsys):
    three, seven, _ = digit_files(tmp_path / "in")
    out = edit.main(["--ckpt", str(trained / "ckpt.pt"), "--image", three, "--image", seven, "--frames", "5",
                     "--steps", "4", "--out", str(tmp_path / "s.png"), "--gif", str(tmp_path / "s.gif")])
    assert Image.open(out).size == (5 * 28 + 6 * 2, 28 + 2 * 2)
    assert Image.open(tmp_path / "s.gif").n_frames == 8  # there and back
    assert "inversion round trip at 4 steps: mean |error|" in capsys.readouterr().err


def test_edits_of_a_class_conditional_model_take_a_label(tmp_path):
    train.main(["--out-dir", str(tmp_path / "out"), "--max-steps", "1", "--class-cond", *TINY])
    three, seven, mask = digit_files(tmp_path / "in")
    ckpt = ["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--label", "3", "--guidance", "2", "--steps", "2"]
    for argv in (["--image", three, "--nrow", "1"], ["--image", three, "--mask", mask, "--jump-n-sample", "1"],
                 ["--image", three, "--image", seven, "--frames", "2"]):
        assert os.path.exists(edit.main(ckpt + argv + ["--out", str(tmp_path / "e.png")]))


def test_bad_edit_input_is_one_line(capsys, tmp_path, trained):
    three, seven, mask = digit_files(tmp_path / "in")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (28, 40)).save(tmp_path / "tall.png")
    ckpt = ["--ckpt", str(trained / "ckpt.pt"), "--steps", "2"]
    for argv, expected in [
        (["--image", str(tmp_path / "none.png")], "--image " + str(tmp_path / "none.png") + ": no such file"),
        (["--image", str(tmp_path / "text.png")], "not an image that can be read"),
        (["--image", three, "--mask", str(tmp_path / "tall.png")], "is 28x40 and --image"),
        (["--image", three, "--strength", "1.5"], "--strength must be between 0 and 1"),
        (["--image", three, "--mask", mask, "--strength", "0.5"], "--mask and --strength edit one image"),
        (["--image", three, "--frames", "4"], "--frames needs two images"),
        ([], "give --image once"),
        (["--image", three, "--image", seven, "--image", three], "give --image once"),
        (["--image", three, "--mask", mask, "--method", "dpm"], "inpainting takes --method ddim or ddpm"),
        (["--image", three, "--image", seven, "--method", "dpm"], "interpolation runs DDIM both ways"),
        (["--image", three, "--image", seven, "--frames", "1"], "--frames must be at least 2"),
    ]:
        assert expected in one_line_error(capsys, edit.main, ckpt + argv), argv


# ---------------------------------------------------------------- speed tooling

def test_bench_prints_its_figures(capsys):
    import bench
    result = bench.main(["--preset", "mnist5k", "--batch-size", "4", "--steps", "2", "--sample-batch", "2",
                         "--device", "cpu", "--channels", "8,16", "--attention", "0,1", "--time-emb-dim", "16",
                         "--run-steps", "3"])
    out = capsys.readouterr().out
    for figure in ("parameters", "forward GFLOP/img", "img/s", "MFU", "ms/NFE/img", "peak memory",
                   "loop   3 steps:", "(no GPU: no GPU time to measure)"):
        assert figure in out
    assert result["images_per_s"] > 0 and 0 < result["mfu"] < 1.5 and result["ms_per_nfe_per_image"] > 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc")
def test_freed_activations_are_kept_not_faulted_in_again():
    # a "step" that allocates and frees 2 x 40 MB: by default glibc maps blocks that large
    # afresh each time, and every page faults in again; after common.setup's tuning it does not
    script = (
        f"import resource, sys; sys.path.insert(0, {REPO!r})\n"
        "import torch, common, train  # the modules, and so the heap, of a training process\n"
        "def faults_per_step():\n"
        "    step = lambda: [torch.ones(10 * 2**20) for _ in range(2)]\n"
        "    step()\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        step()\n"
        "    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5\n"
        "default = faults_per_step()\n"
        "common.keep_freed_memory()\n"
        "print(default, faults_per_step())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    default, kept = map(float, result.stdout.split())
    assert kept < default / 4  # 20482 and 2048 pages per step on x86-64 Linux


def test_unet_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    model = UNet(UNetConfig(3, (8, 16), (False, True), 1, 1, 16, num_classes=4)).eval()
    for p in model.parameters():  # non-zero everywhere, so that every op shows in the output
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 15]), torch.tensor([0, 4])
    explanation = torch._dynamo.explain(model)(x, t, y)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11):  # before, the gradient hook of
        assert explanation.graph_break_count == 0, explanation.break_reasons  # each upsampling breaks it
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-4, rtol=1e-4)
    grads = []  # training runs compiled on CUDA: the backward, dense-gradient hook included, too
    for net in (compiled, model):
        model.zero_grad(set_to_none=True)
        net(x, t, y).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*grads))


# ---------------------------------------------------------------- the layout and the checkpoint format

def test_model_py_imports_no_other_module_of_the_project():
    project = sorted(os.path.splitext(f)[0] for f in os.listdir(REPO) if f.endswith(".py"))
    code = f"import sys; sys.path.insert(0, {REPO!r}); import model; print(sorted(set(sys.modules) & set({project!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['model']"


def test_checkpoints_in_the_format_before_checkpoint_py_load_sample_and_resume(tmp_path):
    # ckpt.pt and ema_fp16.pt as train.py wrote them before the format had its own file: the same
    # keys, with no "clip" in "diffusion" (which then reads as clipping)
    train.main(["--out-dir", str(tmp_path / "new"), "--max-steps", "2", *TINY])
    (tmp_path / "old").mkdir()
    for name in ("ckpt.pt", "ema_fp16.pt"):
        ckpt = torch.load(tmp_path / "new" / name, weights_only=True)
        ckpt["diffusion"] = {k: ckpt["diffusion"][k] for k in ("T", "schedule", "objective", "variance")}
        assert set(ckpt) == ({"model", "ema", "optimizer", "scaler", "step", "model_config", "diffusion", "args",
                              "classes", "rng"} if name == "ckpt.pt" else {"ema", "model_config", "diffusion", "args",
                                                                            "step", "classes"})
        torch.save(ckpt, tmp_path / "old" / name)
    grids = [sample.main(["--ckpt", str(tmp_path / d / n), "--nrow", "2", "--steps", "3", "--out", str(tmp_path / f"{d}{n}.png")])
             for d in ("new", "old") for n in ("ckpt.pt", "ema_fp16.pt")]
    pixels = [np.asarray(Image.open(g)) for g in grids]
    assert np.array_equal(pixels[0], pixels[2]) and np.abs(pixels[1].astype(int) - pixels[3]).max() == 0
    train.main(["--out-dir", str(tmp_path / "old"), "--max-steps", "3", "--resume"])
    train.main(["--out-dir", str(tmp_path / "new"), "--max-steps", "3", "--resume"])
    assert_same_state(state_of(tmp_path / "old" / "ckpt.pt"), state_of(tmp_path / "new" / "ckpt.pt"))


# ---------------------------------------------------------------- a training step that never waits for the device

class HostReads(TorchDispatchMode):
    """Counts, per training step, the ops that read a device value on the host (.item(), bool(t),
    float(t)...): each makes the host wait for a GPU. A step runs from one train_step call to the next."""
    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self, monkeypatch=None):
        super().__init__()
        self.per_step, real_step = [], train.train_step

        def counted_step(*args, **kwargs):
            self.per_step.append(0)
            return real_step(*args, **kwargs)
        if monkeypatch:
            monkeypatch.setattr(train, "train_step", counted_step)
        else:  # under torchrun: patched by hand
            train.train_step = counted_step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS and self.per_step:
            self.per_step[-1] += 1
        return func(*args, **(kwargs or {}))


READ_STEPS = ["--max-steps", "6", "--log-every", "3", "--save-every", "3", "--sample-every", "100"]


def test_a_training_step_reads_nothing_from_the_device_between_the_log_steps(monkeypatch):
    with HostReads(monkeypatch) as reads:
        train.main(["--out-dir", "out", *TINY, *READ_STEPS])
    # steps 3 and 6 log and save: they read the totals; every other step reads nothing
    assert reads.per_step[2] > 0 and reads.per_step[5] > 0
    assert [reads.per_step[i] for i in (0, 1, 3, 4)] == [0, 0, 0, 0], reads.per_step


def test_a_planted_item_in_the_step_is_counted(monkeypatch):
    real_loss = train.Diffusion.loss

    def loss(self, *args, **kwargs):
        losses, t = real_loss(self, *args, **kwargs)
        losses.sum().item()  # what the check must catch: the host waits for the device
        return losses, t
    monkeypatch.setattr(train.Diffusion, "loss", loss)
    with HostReads(monkeypatch) as reads:
        train.main(["--out-dir", "out", *TINY, *READ_STEPS])
    assert reads.per_step[3] == reads.per_step[4] == 1


@pytest.mark.slow
def test_ddp_steps_read_nothing_from_the_device_between_the_log_steps(tmp_path):
    patch = ("import atexit, test_ddpm\n"
             "reads = test_ddpm.HostReads()\n"
             "reads.__enter__()\n"
             f"atexit.register(lambda: open(os.path.join({str(tmp_path)!r}, 'reads%s' % rank), 'w').write(repr(reads.per_step)))\n")
    result = torchrun_two_ranks(tmp_path, "lambda rank, n: 1.0", READ_STEPS, patch)
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):
        per_step = eval((tmp_path / f"reads{rank}").read_text())
        assert len(per_step) == 6 and per_step[2] > 0 and [per_step[i] for i in (0, 1, 3, 4)] == [0, 0, 0, 0], per_step


def test_a_nan_loss_skips_the_update_and_the_ema_update_bitwise(tmp_path, monkeypatch):
    # the 3rd step's loss is NaN: its weights, EMA weights and AdamW state are those of step 2
    train.main(["--out-dir", str(tmp_path / "good"), "--max-steps", "3", *TINY])
    scale_losses(monkeypatch, lambda n: float("nan") if n == 3 else 1.0)
    train.main(["--out-dir", str(tmp_path / "nan"), "--max-steps", "3", "--save-every", "1", *TINY])
    before, after = (load_checkpoint(tmp_path / "nan" / name) for name in ("ckpt.prev.pt", "ckpt.pt"))
    good = load_checkpoint(tmp_path / "good" / "ckpt.pt")
    assert before["step"] == 2 and after["step"] == good["step"] == 3
    for key in ("model", "ema"):
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key])
        assert not all(torch.equal(good[key][k], after[key][k]) for k in good[key])  # a good step 3 moves them
    for a, b in zip(before["optimizer"]["state"].values(), after["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a) and int(b["step"]) == 2


def test_compile_mode_is_handed_to_torch_compile(tmp_path, monkeypatch, capsys):
    modes = []
    monkeypatch.setattr(train.torch, "compile", lambda model, mode: modes.append(mode) or model)
    train.main(["--out-dir", str(tmp_path), "--max-steps", "1", *TINY, "--compile", "--compile-mode", "reduce-overhead"])
    assert modes == ["reduce-overhead"]
    assert "invalid choice: 'fast'" in one_line_error(capsys, train.main, ["--compile-mode", "fast"])


# ---------------------------------------------------------------- published networks as users meet them

# Ho et al.'s layout at 16 px and two levels: small enough for a few CPU steps
HO_16 = dict(HO_CIFAR10, block_out_channels=[128, 128], layers_per_block=1, sample_size=16,
             down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])


@pytest.fixture(scope="module")
def ho_16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-16")
    return folder, diffusers_folder(folder, HO_16)


def hub_cache(root, folder, files, absent=(), repo="org/ddpm-16"):
    """`files` of `folder` in a huggingface_hub cache at `root`, laid out as hf_hub_download
    leaves them (blobs, a snapshot of links to them, refs/main), and a .no_exist marker (the
    hub said it has no such file) per file in `absent`. Returns the snapshot folder."""
    commit, repo_dir = "0123456789abcdef0123456789abcdef01234567", root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "blobs").mkdir()
    for file in files:
        blob, link = repo_dir / "blobs" / hashlib.sha256(file.encode()).hexdigest(), repo_dir / "snapshots" / commit / file
        shutil.copyfile(folder / file, blob)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for file in absent:
        (repo_dir / ".no_exist" / commit / file).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / ".no_exist" / commit / file).touch()
    return repo_dir / "snapshots" / commit


NET_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def test_a_cached_hub_model_loads_offline_and_draws_what_its_snapshot_folder_draws(tmp_path, ho_16):
    # as after hf_hub_download of the network's files alone: scheduler_config.json never asked for
    snapshot = hub_cache(tmp_path / "hub", ho_16[0], NET_FILES)
    flags = ["--method", "ddim", "--steps", "1", "--nrow", "1", "--seed", "3", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, SCRIPT["sample.py"], "--ckpt", "org/ddpm-16", *flags, "--out", "hub.png"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "org/ddpm-16's scheduler_config.json is not in the Hugging Face hub's cache" in warned[0]
    assert "DDPMScheduler's defaults are used" in warned[0]
    sample.main(["--ckpt", str(snapshot), *flags, "--out", "folder.png"])
    assert np.array_equal(np.asarray(Image.open("hub.png")), np.asarray(Image.open("folder.png")))


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """huggingface_hub with its cache in tmp_path/hub and no network: the files it was asked for."""
    import huggingface_hub
    asked = []

    def unreachable(name, file, **kwargs):  # what hf_hub_download raises, after its retries, without network
        asked.append(file)
        raise huggingface_hub.errors.LocalEntryNotFoundError("An error happened while trying to locate the file")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    return asked


def test_the_hub_cache_is_read_before_the_hub_is_asked(tmp_path, capsys, ho_16, no_network):
    # the hub said it has no scheduler_config.json (.no_exist): nothing to ask, nothing to warn of
    hub_cache(tmp_path / "hub", ho_16[0], NET_FILES, absent=["scheduler_config.json"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = load_checkpoint("org/ddpm-16")
    assert no_network == [] and ckpt["diffusion"]["variance"] == "small" and ckpt["diffusion"]["clip"]
    # never asked for: the hub is asked once, and then not again; a warning says the defaults are used
    shutil.rmtree(tmp_path / "hub")
    hub_cache(tmp_path / "hub", ho_16[0], NET_FILES)
    with pytest.warns(UserWarning, match="scheduler_config.json is not in the Hugging Face hub's cache"):
        load_checkpoint("org/ddpm-16")
    assert no_network == ["scheduler_config.json"]
    # a file the network needs: one line that names it
    shutil.rmtree(tmp_path / "hub")
    hub_cache(tmp_path / "hub", ho_16[0], ["config.json", "scheduler_config.json"])
    message = one_line_error(capsys, sample.main, ["--ckpt", "org/ddpm-16"])
    assert "could not download org/ddpm-16's diffusion_pytorch_model.safetensors from the Hugging Face hub" in message
    # a mistyped local path: not a file or folder here, and what the hub answered
    message = one_line_error(capsys, sample.main, ["--ckpt", "runs/ckpt"])
    assert "could not download runs/ckpt's config.json" in message
    assert "nor is there a file or folder runs/ckpt here" in message


def pipeline(folder):
    """The folder rearranged in diffusers' pipeline layout: unet/, scheduler/, model_index.json."""
    (folder / "unet").mkdir()
    for file in NET_FILES:
        shutil.move(folder / file, folder / "unet" / file)
    (folder / "scheduler").mkdir()
    shutil.move(folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")


def write(file, text):
    return lambda folder: (folder / file).write_bytes(text.encode() if isinstance(text, str) else text)


def edit_json(file, **changes):
    return lambda folder: (folder / file).write_text(json.dumps({**json.loads((folder / file).read_text()), **changes}))


def cut(fraction):
    def change(folder):
        data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(data[:int(fraction * len(data))])
    return change


LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:4c3a0f0a\nsize 143502516\n"


@pytest.mark.parametrize("change, file, expected", [
    (write("config.json", "{'in_channels': 3"), "config.json", "is not valid JSON (Expecting property name"),
    (write("scheduler_config.json", "{\"beta"), "scheduler_config.json", "is not valid JSON"),
    (lambda f: (pipeline(f), write("model_index.json", "\xff")(f)), "model_index.json", "is not valid JSON"),
    (write("config.json", "[1, 2]"), "config.json", "holds a JSON list, not an object of settings"),
    (lambda f: write("config.json", json.dumps({k: v for k, v in HO_16.items() if k != "in_channels"}))(f),
     "config.json", "lacks in_channels"),
    (edit_json("config.json", sample_size=0), "config.json", "sample_size 0 is not a positive number"),
    (edit_json("config.json", down_block_types=[], up_block_types=[], block_out_channels=[]), "config.json",
     "are not lists of one width or block name per level"),
    (edit_json("config.json", attn_norm_num_groups=16), "config.json",
     "not in Ho et al.'s layout (attn_norm_num_groups 16, not None)"),
    (edit_json("config.json", resnet_time_scale_shift="scale_shift"), "config.json",
     "resnet_time_scale_shift scale_shift, not default"),
    (edit_json("config.json", block_out_channels=[128, 256]), "diffusion_pytorch_model.safetensors",
     "does not fit its config.json: its downs.1.res.0.conv1.weight (HoUNet's name) is (128, 128, 3, 3), the config's "
     "(256, 128, 3, 3)"),
    (edit_json("scheduler_config.json", trained_betas=[1e-4] * 1000), "scheduler_config.json", "trained_betas [0.0001"),
    (edit_json("scheduler_config.json", thresholding=True), "scheduler_config.json", "thresholding True has no"),
    (edit_json("scheduler_config.json", clip_sample_range=2.0), "scheduler_config.json", "clip_sample_range 2.0 has"),
    (cut(0.5), "diffusion_pytorch_model.safetensors", "is incomplete or not a safetensors file"),
    (cut(0.0001), "diffusion_pytorch_model.safetensors", "download it again"),
    (write("diffusion_pytorch_model.safetensors", LFS), "diffusion_pytorch_model.safetensors", "run `git lfs pull`"),
    (lambda f: (os.remove(f / NET_FILES[1]), zipfile_of_garbage(f / "diffusion_pytorch_model.bin")),
     "diffusion_pytorch_model.bin", "truncated, or not a torch file"),
    (lambda f: (os.remove(f / NET_FILES[1]), (f / "diffusion_pytorch_model.bin").symlink_to("diffusion_pytorch_model.bin")),
     "diffusion_pytorch_model.bin", "Too many levels of symbolic links"),
])
def test_malformed_published_files_are_one_line_that_names_the_file(tmp_path, capsys, ho_16, change, file, expected):
    shutil.copytree(ho_16[0], tmp_path / "net")
    change(tmp_path / "net")
    message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "net")])
    assert file in message and expected in message and len(message) <= 300 + len(str(tmp_path)), message


def zipfile_of_garbage(path):
    import zipfile
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02garbage")
        archive.writestr("archive/version", b"3\n")


def test_a_config_is_read_as_diffusers_reads_it(tmp_path, capsys, ho_16):
    from diffusers import UNet2DModel
    # only what Ho's layout needs said: the rest is diffusers' default, and it is Ho's
    sparse = {k: HO_16[k] for k in pretrained.REQUIRED} | dict(
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, downsample_padding=0, attention_head_dim=None,
        sample_size=[16, 16], dropout=0.1)
    shutil.copytree(ho_16[0], tmp_path / "net")
    (tmp_path / "net" / "config.json").write_text(json.dumps(sparse))
    ours, theirs = checkpoint.from_pretrained(str(tmp_path / "net")), UNet2DModel.from_pretrained(tmp_path / "net").eval()
    assert not ours.training  # eval mode: dropout off, the same output at each call
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (0, 999):
            assert (ours(x, torch.full((2,), t)) - theirs(x, torch.full((2,), t)).sample).abs().max() <= 1e-4
    # left out, those settings are diffusers' defaults, not Ho's: refused, naming them
    (tmp_path / "net" / "config.json").write_text(json.dumps({k: HO_16[k] for k in pretrained.REQUIRED}))
    message = one_line_error(capsys, sample.main, ["--ckpt", str(tmp_path / "net")])
    assert "not in Ho et al.'s layout (attention_head_dim 8, not None; downsample_padding 1, not 0; flip_sin_to_cos " \
           "True, not False; freq_shift 0, not 1; norm_eps 1e-05, not 1e-06; a setting left out" in message


def test_init_from_carries_clip_sample_into_its_grids_checkpoints_and_resume(tmp_path, capsys, monkeypatch, ho_16):
    shutil.copytree(ho_16[0], tmp_path / "net")
    edit_json("scheduler_config.json", clip_sample=False)(tmp_path / "net")
    write_images(tmp_path / "imgs", [f"{i:02d}.png" for i in range(4)], (20, 20))
    grids = []
    monkeypatch.setattr(sample, "sample_grid", lambda diffusion, *args, **kwargs: grids.append(diffusion.clip))
    argv = ["--dataset", "folder", "--data-dir", str(tmp_path / "imgs"), "--out-dir", str(tmp_path / "out"),
            "--batch-size", "2", "--device", "cpu"]
    train.main(argv + ["--init-from", str(tmp_path / "net"), "--max-steps", "1"])
    assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["diffusion"]["clip"] is False
    train.main(argv + ["--resume", "--max-steps", "2"])
    assert grids == [False, False]
    ckpt_path = str(tmp_path / "out" / "ckpt.pt")
    assert load_checkpoint(ckpt_path)["diffusion"]["clip"] is False
    assert sample.load(ckpt_path, sample.parse_args([]), torch.device("cpu"))[1].clip is False
    # weights that do not fit the config: one line naming the first tensor, in --init-from too
    edit_json("config.json", block_out_channels=[128, 256])(tmp_path / "net")
    message = one_line_error(capsys, train.main, argv[:-4] + ["--init-from", str(tmp_path / "net"), "--out-dir",
                                                              str(tmp_path / "o2")])
    assert "diffusion_pytorch_model.safetensors does not fit its config.json: its downs.1.res.0.conv1.weight" in message


def test_fid_reads_the_checkpoint_before_it_trains_its_digit_classifier(tmp_path, capsys, monkeypatch, ho_16):
    shutil.copytree(ho_16[0], tmp_path / "net")
    edit_json("scheduler_config.json", thresholding=True)(tmp_path / "net")
    monkeypatch.setattr(fid, "extractor", lambda *args: pytest.fail("the digit classifier came first"))
    message = one_line_error(capsys, fid.main, ["--ckpt", str(tmp_path / "net"), "--features", "digits", "--device", "cpu"])
    assert "scheduler_config.json: thresholding True has no equivalent here" in message


# ---------------------------------------------------------------- benchmarks/

def test_the_recipe_plot_draws_a_line_per_training_run_from_the_mean_of_its_seeds(tmp_path):
    rows = [("old", 0, 250, 1.0, 0, 30.0), ("old", 0, 250, 1.0, 1000, 20.0), ("old", 0, 500, 2.0, 0, 10.0),
            ("old", 1, 250, 1.1, 0, 28.0), ("new", 0, 250, 0.9, 0, 12.0)]
    with open(tmp_path / "r.csv", "w", newline="") as f:
        csv.writer(f).writerows([("recipe", "train_seed", "step", "minutes", "sample_seed", "distance"), *rows])
    script = os.path.join(REPO, "benchmarks", "recipe_plot.py")
    result = subprocess.run([sys.executable, script, "--csv", str(tmp_path / "r.csv"), "--out", str(tmp_path / "p.png")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(tmp_path / "p.png").convert("L"))
    assert image.shape[0] > 300 and image.std() > 10  # a drawn figure, not a blank one
    sys.path.insert(0, os.path.dirname(script))
    try:
        import recipe_plot
    finally:
        sys.path.pop(0)
    with open(tmp_path / "r.csv", newline="") as f:
        runs = recipe_plot.curves(list(csv.DictReader(f)))
    assert runs == {("old", "0"): [(1.0, 25.0), (2.0, 10.0)], ("old", "1"): [(1.1, 28.0)], ("new", "0"): [(0.9, 12.0)]}
    missing = subprocess.run([sys.executable, script, "--csv", str(tmp_path / "none.csv")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"error: --csv {tmp_path / 'none.csv'}: No such file or directory"]


def test_the_inpainting_benchmark_runs_on_a_checkpoint_of_digits(trained, monkeypatch, capsys):
    """benchmarks/inpaint_check.py end to end on a 28-px checkpoint, with an untrained stand-in for
    fid.py's digit classifier (training it takes a minute): its four rows, each over the 200 held-out digits."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import inpaint_check
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    monkeypatch.setattr(fid, "digit_classifier", lambda cache_dir, device: (fid.Digits().eval(), "untrained"))
    rates = inpaint_check.main(["--ckpt", str(trained / "ckpt.pt"), "--steps", "3", "--device", "cpu"])
    assert list(rates) == ["the digits as they are", "lower half black (zero fill)", "plain replacement",
                           "RePaint (jump length 10, 10 resamplings)"]
    assert all(abs(rate * 200 - round(rate * 200)) < 1e-3 for rate in rates.values())  # a share of the 200 digits
    assert capsys.readouterr().out.count("of 200 digits as they were") == 4
