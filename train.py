"""
Train a DDPM. Each preset sets the model and optimisation for a dataset; flags override it.

    python train.py                                   # 5000 embedded MNIST digits (~8 min on 2 CPU cores)
    python train.py --dataset cifar10                 # one GPU (downloads CIFAR-10 into ./data)
    python train.py --dataset celeba                  # from ./data/celeba/img_align_celeba/
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10   # DDP, 8 GPUs
    python train.py --resume                          # continue out/ckpt.pt
    python train.py --preset ho-cifar10               # Ho et al.'s CIFAR-10 network and recipe
    python train.py --dataset folder --data-dir DIR --init-from google/ddpm-ema-church-256   # fine-tune

Writes out/ckpt.pt (everything needed to resume or sample), out/samples/step_*.png (a
fixed-seed EMA grid), out/log.csv (the logged values) and, at the end, out/ema_fp16.pt (EMA
weights alone, for sampling).
"""
import argparse
import collections
import copy
import math
import os
import sys
import types

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import common
import sample
from data import DATASETS, batches, load_dataset, random_hflip
from diffusion import Diffusion
from model import UNetConfig, build_unet, check_image_size

# data
DATASET = "mnist5k"  # mnist5k | mnist | cifar10 | celeba | folder
PRESET = None  # the model and optimisation of a preset (below); None = the dataset's
DATA_DIR = None  # folder: the images; mnist, cifar10, celeba: where they are or download to (default ./data)
IMAGE_SIZE = None  # None = the dataset's own (28 mnist, 32 cifar10, 64 celeba / folder)
CLASS_COND = False  # condition on labels (mnist5k, mnist, cifar10, folder of class sub-folders)
LABEL_DROPOUT = 0.1  # with CLASS_COND: how often a label becomes "no label" (for guidance)
# model (see model.UNetConfig)
INIT_FROM = None  # fine-tune a network: a checkpoint, a hub name (google/ddpm-ema-church-256) or a folder
LAYOUT = "ours"  # ours | ho (Ho et al.'s wiring of the blocks)
CHANNELS = (64, 128, 256, 256)  # width per level, e.g. 32,64,64
ATTENTION = (False, False, True, True)  # self-attention per level, e.g. 0,0,1
NUM_RES = 2  # residual blocks per level
NECK_LENGTH = 2  # residual blocks at the bottom
TIME_EMB_DIM = 64  # sinusoidal timestep embedding size (the MLP widens it 4x)
DROPOUT = 0.1  # in every residual block
# diffusion
TIMESTEPS = 1000  # T
SCHEDULE = "linear"  # linear | cosine
OBJECTIVE = "eps"  # eps | v | x0: what the network predicts
VARIANCE = "small"  # the ddpm sampler's, for sample.py: small (beta-tilde_t) | large (beta_t, Ho et al.'s CIFAR-10)
LOSS = "mse"  # mse | l1
MIN_SNR = 0.0  # min-SNR-gamma loss weighting (5 is the paper's choice); 0 = off
# optimisation
BATCH_SIZE = 128  # images per step, per process
LR = 2e-4  # AdamW learning rate
WARMUP_STEPS = 1000  # linear warm-up of the learning rate
LR_DECAY = False  # cosine decay to LR / 10 at MAX_STEPS
WEIGHT_DECAY = 0.0  # AdamW weight decay
GRAD_CLIP = 1.0  # max gradient norm
MAX_STEPS = 800_000  # training steps (the LR schedule and the ETA read it)
EMA_DECAY = 0.9999  # warmed up: min(EMA_DECAY, (1 + step) / (10 + step))
MAX_BAD_STEPS = 5  # stop after this many steps in a row with a non-finite loss or gradient
# system
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
DTYPE = "auto"  # auto (bf16 or fp16 autocast on CUDA, fp32 elsewhere) | float32 | bfloat16 | float16
COMPILE = None  # torch.compile the model; None = on CUDA only
COMPILE_MODE = "default"  # default | reduce-overhead (CUDA graphs: the step launched as one) | max-autotune
WORKERS = None  # DataLoader workers; None = 0 for in-memory datasets, else min(4, CPU cores)
SEED = 0  # initial weights and data order (the same on every rank), noise (each DDP rank adds its rank)
# output
OUT_DIR = "out"  # ckpt.pt, ckpt.prev.pt, ema_fp16.pt, samples/, log.csv
LOG_EVERY = 100  # steps between log lines
SAMPLE_EVERY = 5000  # steps between EMA sample grids (sample.py's default sampler, fixed seed)
SAVE_EVERY = 5000  # steps between checkpoints
KEEP_EVERY = 0  # keep the EMA weights of every Nth step as OUT_DIR/snapshots/ema_<step>.pt (fp16); 0 = none
RESUME = False  # continue from OUT_DIR/ckpt.pt
# logging (LOG_EVERY's lines always go to OUT_DIR/log.csv too)
WANDB = False  # also log to Weights & Biases (pip install wandb)
WANDB_PROJECT = "ddpm"  # the W&B project
WANDB_RUN_NAME = None  # the W&B run's name; None = W&B picks one

# What each dataset trains with unless a flag says otherwise.
PRESETS = {
    # recognizable digits after ~8 minutes on 2 CPU cores; v and the cosine schedule at a doubled lr
    # gave 30.5% lower digit distance than eps, linear, 2e-3 at the same cost (benchmarks/recipe.md)
    "mnist5k": dict(channels=(32, 64, 64), attention=(False, False, True), num_res=1, neck_length=1,
                    dropout=0.0, objective="v", schedule="cosine", batch_size=64, lr=4e-3, warmup_steps=100,
                    lr_decay=True, max_steps=2000, log_every=50, sample_every=250, save_every=250),
    # the reference CIFAR-10 (32x32) and CelebA (64x64) configurations, for a GPU
    "cifar10": dict(channels=(64, 128, 256, 256), attention=(False, False, True, True), num_res=2,
                    batch_size=100, schedule="cosine", timesteps=1000, dropout=0.1),
    "celeba": dict(image_size=64, channels=(64, 128, 256, 512, 512), num_res=3,
                   attention=(False, False, True, True, False), batch_size=100, dropout=0.1,
                   max_steps=500_000),
    "folder": dict(image_size=64, channels=(64, 128, 256, 512), attention=(False, False, True, True),
                   num_res=2, batch_size=64, dropout=0.1),
    # Ho et al. 2020's CIFAR-10 run: their network (35.7M parameters) and recipe
    "ho-cifar10": dict(dataset="cifar10", layout="ho", channels=(128, 256, 256, 256), time_emb_dim=128,
                       attention=(False, True, False, False), num_res=2, dropout=0.1, batch_size=128,
                       warmup_steps=5000, variance="large"),
}
PRESETS["mnist"] = {**PRESETS["mnist5k"], "max_steps": 10_000, "log_every": 100, "sample_every": 1000, "save_every": 1000}


def build_parser(defaults):
    """A flag per constant above (--data-dir for DATA_DIR), its comment as the help."""
    as_flags = lambda preset: " ".join(f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else
                                       f"--{k} {common.as_typed(v)}" for k, v in preset.items()).replace("_", "-")
    presets = "\n".join(f"  {name}: {as_flags(preset)}" for name, preset in PRESETS.items())
    p = common.parser(__doc__, f"--dataset (or --preset) picks a preset, which sets these (the defaults above "
                               f"are those of --dataset {defaults['DATASET']}):\n{presets}")
    return common.add_flags(
        p, globals(), defaults, DATASET=dict(choices=tuple(DATASETS)), PRESET=dict(choices=tuple(PRESETS)),
        LAYOUT=dict(choices=("ours", "ho")), VARIANCE=dict(choices=("small", "large")), IMAGE_SIZE=dict(type=int),
        SCHEDULE=dict(choices=("linear", "cosine")), OBJECTIVE=dict(choices=("eps", "v", "x0")),
        LOSS=dict(choices=("mse", "l1")), DTYPE=dict(choices=("auto", "float32", "bfloat16", "float16")),
        COMPILE=dict(dest="use_compile", action=argparse.BooleanOptionalAction), WORKERS=dict(type=int),
        COMPILE_MODE=dict(choices=("default", "reduce-overhead", "max-autotune")))


def parse_args(argv=None):
    """The constants above, then the dataset's preset, then the flags given."""
    peek = common.Parser(add_help=False)
    peek.add_argument("--dataset")
    peek.add_argument("--preset", choices=tuple(PRESETS))
    known = peek.parse_known_args(argv)[0]
    name = known.preset or known.dataset or DATASET
    preset = {k.upper(): v for k, v in PRESETS.get(name, {}).items()}
    dataset = known.dataset or preset.get("DATASET", name)
    p = build_parser({**globals(), **preset, "DATASET": dataset, "PRESET": known.preset})
    args = p.parse_args(argv)
    args.explicit = sorted(vars(build_parser(collections.defaultdict(lambda: argparse.SUPPRESS)).parse_args(argv)))
    common.at_least(p, args, 1, "batch_size", "max_steps", "log_every", "sample_every", "save_every",
                    "max_bad_steps", "image_size")
    common.at_least(p, args, 2, "timesteps")
    common.at_least(p, args, 0, "warmup_steps", "weight_decay", "min_snr", "workers", "keep_every")
    common.check(p, args, lambda v: v > 0, "above 0", "lr", "grad_clip")
    common.check(p, args, lambda v: 0 <= v < 1, "at least 0 and below 1", "label_dropout", "dropout", "ema_decay")
    if args.data_dir and args.dataset == "mnist5k":
        p.error("--data-dir has no use with the embedded mnist5k: for a folder of images, add --dataset folder")
    return args


# ---------------------------------------------------------------- training helpers

def unet_config(args, channels, num_classes=0):
    """The UNet the model flags describe, for images with `channels` channels."""
    return UNetConfig(channels, args.channels, args.attention, args.num_res, args.neck_length,
                      args.time_emb_dim, args.dropout, num_classes, args.layout)


def make_optimizer(model, args, device, dtype):
    """AdamW (fused: one kernel for all parameters) and the gradient scaler fp16 needs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    return optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def learning_rate(step, args):
    """Linear warm-up, then constant, or cosine decay to lr / 10."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.lr_decay:
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema_params, params, step, decay, skip):
    """EMA of the weights; the decay warms up so that early averages are not mostly the init. The
    weight is a tensor, 0 after a skipped update (skip = 1): the device decides, the host reads nothing."""
    weight = (1 - skip) * (1 - min(decay, (1 + step) / (10 + step)))
    torch._foreach_lerp_(ema_params, params, [weight.expand_as(p) for p in params])


def train_step(net, diffusion, optimizer, scaler, params, x, y, args, dtype, world=1):
    """One update with no host read of a device value: loss under autocast, backward (scaled for
    fp16), unscale, clip, step. A non-finite loss or gradient skips the update on the device, on
    every rank. Returns each image's loss, its t, the gradient norm, skip (a 0-dim float, 1 for a
    skipped update) and bad (the same, but for fp16 only a non-finite loss: its scaler skips
    overflowing gradients and lowers its scale by itself)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        losses, t = diffusion.loss(net, x, y, args.loss, args.min_snr)
        loss = losses.mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    flags = (~torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()]))).float()
    if world > 1:  # a rank can see a non-finite loss with finite gradients: all of them skip the step
        dist.all_reduce(flags, dist.ReduceOp.MAX)
    skip = flags.max()  # exactly 0 or 1: AdamW takes it as found_inf and takes it off its step count
    if optimizer.defaults["fused"]:
        optimizer.grad_scale, optimizer.found_inf = None, skip  # as GradScaler.step hands them over
        optimizer.step()
    elif not skip.item():  # no fused AdamW (MPS): the host decides
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses.detach(), t, grad_norm, skip, flags[0] if scaler.is_enabled() else skip


def save_grid(run, step):
    """The images `python sample.py --nrow 4` (--label all --nrow 10 with classes) draws from this
    step's checkpoint: EMA weights, the default sampler, the same noise at every step."""
    path = os.path.join(run.args.out_dir, "samples", f"step_{step:07d}.png")
    flags = sample.parse_args(["--nrow", "10" if run.classes else "4", "--seed", str(run.args.seed), "--out", path])
    flags.image_size = run.args.image_size
    return sample.sample_grid(run.diffusion, run.ema, flags, "all" if run.classes else None, progress=False)


# ---------------------------------------------------------------- the run

def setup(args):
    """The run in the order it is made: its settings (--resume's, or --init-from's network), the
    device, the data, the network, the optimizer, and the network the loop calls (compiled, DDP)."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, ckpt = checkpoint.resume(args, ckpt_path)
    init = checkpoint.init_from(args) if ckpt is None else None
    rank, world, device = common.setup(args.device)
    if rank == 0:  # a bad --out-dir fails now, not at the first grid or save
        common.writable(*[("--out-dir", os.path.join(args.out_dir, path)) for path in
                          ("samples/step.png", "ckpt.pt") + ("snapshots/ema.pt",) * bool(args.keep_every)])
    if rank > 0:  # rank 0 loads first, alone: cifar10 and mnist download into one folder
        common.wait_for_all(world)
    dataset = load_dataset(args.dataset, args.data_dir, args.image_size, args.class_cond)
    if rank == 0:
        common.wait_for_all(world)
    args.image_size = dataset.image_size
    if args.class_cond and dataset.num_classes == 0:
        raise ValueError(f"--class-cond needs labels, and {args.dataset} has none")
    classes = dataset.classes if args.class_cond else []
    config = unet_config(args, dataset.channels, len(classes))
    check_image_size(args.image_size, len(config.channels))
    if ckpt is not None:
        checkpoint.check_fits(ckpt, config, args, resumed_from=ckpt_path)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_unet(config).to(device)
    if init is not None:  # its EMA weights (a published network has only those)
        checkpoint.check_fits(init, config, args)
        model.load_state_dict(init["ema"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    dtype = common.amp_dtype(args.dtype, device)
    optimizer, scaler = make_optimizer(model, args, device, dtype)
    torch.manual_seed(args.seed + rank)  # different noise on every rank
    step = 0 if ckpt is None else checkpoint.restore(ckpt, ckpt_path, model, ema, optimizer, scaler, device)
    if ckpt is not None and world > 1:  # only rank 0's RNG state was saved: each rank its own noise again
        torch.manual_seed(args.seed + rank + 1_000_003 * step)
    net = model  # what the loop calls, compiled and DDP-wrapped; `model` stays the raw module
    if args.use_compile or (args.use_compile is None and device.type == "cuda"):
        net = torch.compile(net, mode=args.compile_mode)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        print(f"{args.dataset} ({len(dataset)} images, {args.image_size} px) | {type(model).__name__} with "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {device}, "
              f"{world} process(es), {dtype or torch.float32} | steps {step} -> {args.max_steps}")
    clip = getattr(args, "clip", True)  # False only from --init-from a network whose scheduler does not clip
    diffusion = Diffusion(args.timesteps, args.schedule, args.objective, device, args.variance, clip)
    return types.SimpleNamespace(args=args, rank=rank, world=world, device=device, dtype=dtype, dataset=dataset,
                                 classes=classes, model=model, ema=ema, optimizer=optimizer, scaler=scaler, net=net,
                                 diffusion=diffusion, ckpt_path=ckpt_path, step=step)


def loop(run):
    """Train from run.step to --max-steps. The host reads the device (the totals) and exchanges
    the interrupt flag with the other ranks only at fixed steps, the same on every rank: the log
    lines and every write; one process also at once after a signal. Rank 0 logs, saves and draws
    the grids. Returns the signal that stopped the run early, or 0."""
    args, step, model, ema = run.args, run.step, run.model, run.ema
    params, ema_params = list(model.parameters()), list(ema.parameters())
    data = batches(run.dataset, args.batch_size, args.seed, run.rank, run.world, step, run.device, args.workers)
    log = common.RunLog(args, step, run.world) if run.rank == 0 else None
    totals, interrupt, stop = common.zero_totals(run.device), common.Interrupt(), 0
    try:
        while step < args.max_steps and not stop:
            x, y = next(data)  # step i trains on batch i, skipped or not: a resumed run goes on from there
            if run.dataset.hflip:
                x = random_hflip(x)
            if args.class_cond:  # drop labels so the model also learns p(x) (Ho & Salimans 2022)
                y = torch.where(torch.rand(y.shape, device=x.device) < args.label_dropout, len(run.classes), y)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            losses, t, grad_norm, skip, bad = train_step(run.net, run.diffusion, run.optimizer, run.scaler, params,
                                                         x, y if args.class_cond else None, args, run.dtype, run.world)
            update_ema(ema_params, params, step, args.ema_decay, skip)
            step += 1
            totals = common.tally(totals, losses, t, grad_norm, skip, bad, step, args.timesteps)
            logs, saves, grids = (step % n == 0 or step == args.max_steps
                                  for n in (args.log_every, args.save_every, args.sample_every))
            keeps = args.keep_every and step % args.keep_every == 0
            if not (logs or saves or grids or keeps or run.world == 1 and interrupt.signum):
                continue
            stop = torch.tensor(interrupt.signum or 0)
            if run.world > 1:  # Ctrl-C on any rank stops them all, here
                dist.all_reduce(stop, dist.ReduceOp.MAX)
            stop, read = stop.item(), {k: v.tolist() for k, v in totals.items()}
            if read["longest"] >= args.max_bad_steps:  # every rank skipped the same steps: all stop here
                raise FloatingPointError(f"{read['longest']:.0f} steps in a row with a non-finite loss or gradient "
                                         f"from step {read['began']:.0f}; stopped without saving")
            if logs:
                totals = common.zero_totals(run.device, totals["run"])
            if run.rank > 0:  # only rank 0 logs, saves and samples
                continue
            if logs:
                log.line(step, read, learning_rate(step - 1, args))
            state = checkpoint.state(run, step) if saves or stop or keeps else None
            if saves or stop:  # first: whatever the grid does
                checkpoint.save(state, run.ckpt_path)
            if keeps:  # a history to sample from and score (fid.py)
                checkpoint.save_export(state, os.path.join(args.out_dir, "snapshots", f"ema_{step:07d}.pt"))
            if grids:
                log.grid(step, save_grid(run, step))
            if stop:
                print(f"saved {run.ckpt_path} at step {step}; resume with --resume", file=sys.stderr)
    finally:
        interrupt.restore()
        if log:
            log.close()
        if run.world > 1:
            dist.destroy_process_group()
    run.step = step
    return stop


def train(args):
    run = setup(args)
    stop = loop(run)
    if stop:  # a signal to any rank stops them all, and none of them claims to be done
        sys.exit(128 + stop)
    if run.rank == 0:
        export = os.path.join(run.args.out_dir, "ema_fp16.pt")
        checkpoint.save_export(checkpoint.state(run, run.step), export)
        print(f"done: {run.ckpt_path}, {export}")
    return run.model, run.ema


def main(argv=None):
    return common.run(train, parse_args(argv), errors=(ValueError, OSError, FloatingPointError))


if __name__ == "__main__":
    main()
