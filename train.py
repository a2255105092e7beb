"""
Train a DDPM. Each preset sets the model and optimisation for a dataset; flags override it.

    python train.py                                   # 5000 embedded MNIST digits (~12 min on a CPU)
    python train.py --dataset cifar10                 # one GPU (downloads CIFAR-10 into ./data)
    python train.py --dataset celeba --data-dir ~/celeba
    torchrun --standalone --nproc_per_node=8 train.py --dataset cifar10   # DDP, 8 GPUs
    python train.py --resume                          # continue out/ckpt.pt

Writes out/ckpt.pt (everything needed to resume or sample), out/samples/step_*.png (a
fixed-seed EMA grid) and, at the end, out/ema_fp16.pt (EMA weights alone, for sampling).
"""
import argparse
import copy
import ctypes
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.utils import save_image

from data import DATASETS, ArrayDataset, load_dataset, random_hflip
from diffusion import Diffusion
from model import UNet, UNetConfig, check_image_size, config_dict, load_checkpoint

# data
DATASET = "mnist5k"  # mnist5k | mnist | cifar10 | celeba | folder
DATA_DIR = None  # celeba / folder: the images; mnist / cifar10: download folder (default ./data)
IMAGE_SIZE = None  # None = the dataset's own (28 mnist, 32 cifar10, 64 celeba / folder)
CLASS_COND = False  # condition on labels (mnist5k, mnist, cifar10, folder of class sub-folders)
LABEL_DROPOUT = 0.1  # with CLASS_COND: how often a label becomes "no label" (for guidance)
# model (see model.UNetConfig)
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
WORKERS = None  # DataLoader workers; None = 0 for in-memory datasets, else min(4, CPU cores)
SEED = 0  # initial weights and data order (the same on every rank), noise (each DDP rank adds its rank)
# output
OUT_DIR = "out"  # ckpt.pt, ckpt.prev.pt, ema_fp16.pt, samples/
LOG_EVERY = 100  # steps between log lines
SAMPLE_EVERY = 5000  # steps between EMA sample grids (DDIM, eta 1, SAMPLE_STEPS steps, fixed seed)
SAMPLE_STEPS = 50  # DDIM steps for those grids
SAVE_EVERY = 5000  # steps between checkpoints
RESUME = False  # continue from OUT_DIR/ckpt.pt

# What each dataset trains with unless a flag says otherwise.
PRESETS = {
    # recognizable digits after ~10 minutes on 2 CPU cores (see README)
    "mnist5k": dict(channels=(32, 64, 64), attention=(False, False, True), num_res=1, neck_length=1,
                    dropout=0.0, batch_size=64, lr=2e-3, warmup_steps=100, lr_decay=True,
                    max_steps=2000, log_every=50, sample_every=250, save_every=250),
    "mnist": dict(channels=(32, 64, 64), attention=(False, False, True), num_res=1, neck_length=1,
                  dropout=0.0, batch_size=64, lr=2e-3, warmup_steps=100, lr_decay=True,
                  max_steps=10_000, sample_every=1000, save_every=1000),
    # the reference CIFAR-10 (32x32) and CelebA (64x64) configurations, for a GPU
    "cifar10": dict(channels=(64, 128, 256, 256), attention=(False, False, True, True), num_res=2,
                    batch_size=100, schedule="cosine", timesteps=1000, dropout=0.1),
    "celeba": dict(image_size=64, channels=(64, 128, 256, 512, 512), num_res=3,
                   attention=(False, False, True, True, False), batch_size=100, dropout=0.1,
                   max_steps=500_000),
    "folder": dict(image_size=64, channels=(64, 128, 256, 512), attention=(False, False, True, True),
                   num_res=2, batch_size=64, dropout=0.1),
}
MODEL_ARGS = ("channels", "attention", "num_res", "neck_length", "time_emb_dim", "dropout",
              "image_size", "class_cond", "timesteps", "schedule", "objective")


HELP = dict(re.findall(r"^([A-Z_]+) = .*?  # (.*)$", open(__file__).read(), re.M))  # the comments above


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass  # the docstring's commands as written, and every flag's default


def ints(text):
    return tuple(int(v) for v in text.split(","))


def bools(text):
    values = ints(text)
    if not set(values) <= {0, 1}:
        raise argparse.ArgumentTypeError(f"use 0 or 1 per level, e.g. 0,0,1, not {text}")
    return tuple(bool(v) for v in values)


def build_parser(default=None):
    """A flag per constant above (--data-dir for DATA_DIR), its comment as the help."""
    value = lambda v: ",".join(str(int(x)) for x in v) if isinstance(v, tuple) else v  # as typed
    presets = "\n".join(f"  {name}: " + " ".join(f"{k}={value(v)}" for k, v in preset.items())
                        for name, preset in PRESETS.items())
    p = Parser(description=__doc__, formatter_class=Formatter,
               epilog=f"--dataset picks a preset, which replaces the defaults above:\n{presets}")

    def add(name, **kwargs):
        p.add_argument("--" + name.lower().replace("_", "-"), default=default or globals()[name],
                       help=HELP[name], **kwargs)
    flag = argparse.BooleanOptionalAction
    add("DATASET", choices=tuple(DATASETS))
    add("DATA_DIR")
    add("IMAGE_SIZE", type=int)
    add("CLASS_COND", action=flag)
    add("LABEL_DROPOUT", type=float)
    add("CHANNELS", type=ints)
    add("ATTENTION", type=bools)
    add("NUM_RES", type=int)
    add("NECK_LENGTH", type=int)
    add("TIME_EMB_DIM", type=int)
    add("DROPOUT", type=float)
    add("TIMESTEPS", type=int)
    add("SCHEDULE", choices=("linear", "cosine"))
    add("OBJECTIVE", choices=("eps", "v", "x0"))
    add("LOSS", choices=("mse", "l1"))
    add("MIN_SNR", type=float)
    add("BATCH_SIZE", type=int)
    add("LR", type=float)
    add("WARMUP_STEPS", type=int)
    add("LR_DECAY", action=flag)
    add("WEIGHT_DECAY", type=float)
    add("GRAD_CLIP", type=float)
    add("MAX_STEPS", type=int)
    add("EMA_DECAY", type=float)
    add("MAX_BAD_STEPS", type=int)
    add("DEVICE")
    add("DTYPE", choices=("auto", "float32", "bfloat16", "float16"))
    add("COMPILE", dest="use_compile", action=flag)
    add("WORKERS", type=int)
    add("SEED", type=int)
    add("OUT_DIR")
    add("LOG_EVERY", type=int)
    add("SAMPLE_EVERY", type=int)
    add("SAMPLE_STEPS", type=int)
    add("SAVE_EVERY", type=int)
    add("RESUME", action=flag)
    return p


def parse_args(argv=None):
    """The constants above, then the dataset's preset, then the flags given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = vars(build_parser(argparse.SUPPRESS).parse_args(argv))
    parser.set_defaults(**PRESETS[args.dataset])
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit)
    for name in ("batch_size", "max_steps", "log_every", "sample_every", "save_every", "sample_steps",
                 "max_bad_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("warmup_steps", "weight_decay", "min_snr", "workers"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 or more")
    if not args.lr > 0:
        parser.error("--lr must be above 0")
    if args.image_size is not None and args.image_size < 1:
        parser.error("--image-size must be at least 1")
    if not args.grad_clip > 0:
        parser.error("--grad-clip must be above 0")
    if args.data_dir and args.dataset == "mnist5k":
        parser.error("--data-dir has no use with the embedded mnist5k: for a folder of images, "
                     "add --dataset folder")
    if "sample_steps" not in explicit:  # the default 50 grid steps, for a small --timesteps
        args.sample_steps = min(args.sample_steps, max(1, args.timesteps))
    for name in ("label_dropout", "dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 0 and below 1")
    return args


def resume_args(args, ckpt):
    """A resumed run keeps the checkpoint's settings, but for the flags given now and the
    --out-dir it was found in; a flag that would change the network or the diffusion is an error."""
    saved = ckpt["args"]
    changed = [n for n in MODEL_ARGS if n in args.explicit and saved[n] != list_or_value(getattr(args, n))]
    if changed:
        raise ValueError("the checkpoint was trained with other " + ", ".join(
            f"--{n.replace('_', '-')} ({saved[n]} there, {getattr(args, n)} here)" for n in changed))
    merged = {**saved, **{n: getattr(args, n) for n in args.explicit}, "explicit": args.explicit,
              "out_dir": args.out_dir}  # a moved run folder keeps its outputs together
    return argparse.Namespace(**{k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()})


def list_or_value(v):
    return list(v) if isinstance(v, tuple) else v


def keep_freed_memory():
    """glibc hands freed blocks over 128 KB back to the OS, and the next step's activations fault
    them in again page by page (~35k page faults per mnist5k training step). Keeping them makes
    CPU training ~10% and sampling ~20% faster, for ~15% more peak memory. Linux (glibc) only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, Windows, musl: their allocators are left as they are
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap,
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: which keeps up to 1 GiB of freed memory


def gpus():
    """How many CUDA GPUs this process can use (the seam tests patch to pretend there are some)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def use_gpu(device):
    """Make `device` (cuda:N) this process's GPU, with TF32 matmuls and convolutions (Ampere and later)."""
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def setup(args):
    """(rank, world size, device); starts the process group under torchrun."""
    keep_freed_memory()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "auto":
        device = "cuda" if gpus() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda:") and world > 1:
        raise ValueError(f"--device {device} would put every torchrun process on one GPU: give "
                         "--device cuda (or auto), and each process takes the GPU of its LOCAL_RANK")
    if device == "cuda":  # a GPU by index, as set_device needs: under torchrun, the LOCAL_RANK-th
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and device.index >= gpus()
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: this machine has no such device (--device auto picks one)")
    if device.type == "cuda":
        use_gpu(device)
    if world > 1:  # NCCL takes CUDA tensors only: the CPU stop flag goes through gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def wait_for_all(world):
    """Every process gets here before any goes on (a CPU all-reduce: gloo, also beside NCCL)."""
    if world > 1:
        dist.all_reduce(torch.zeros(1))


def amp_dtype(args, device):
    """The autocast dtype, or None for plain fp32."""
    if args.dtype == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]


def unet_config(args, channels, num_classes=0):
    """The UNet the model flags describe, for images with `channels` channels."""
    return UNetConfig(channels, args.channels, args.attention, args.num_res, args.neck_length,
                      args.time_emb_dim, args.dropout, num_classes)


def make_optimizer(model, args, device, dtype):
    """AdamW (fused: one kernel for all parameters) and the gradient scaler fp16 needs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    return optimizer, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def batches(dataset, args, rank, world, step, device):
    """Endless batches, in an order fixed by (seed, epoch): resuming at `step` goes on with the
    same images in the same order as a run that never stopped."""
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    per_epoch = len(sampler) // args.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are too few for --batch-size {args.batch_size} "
                         f"on {world} process(es)")
    workers = args.workers if args.workers is not None else 0 if isinstance(dataset, ArrayDataset) else \
        min(4, os.cpu_count() or 1)

    def indices():  # every epoch's order, from `step` on, through one loader whose workers never stop
        epoch, skip = divmod(step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            yield from list(sampler)[skip * args.batch_size:per_epoch * args.batch_size]
            epoch, skip = epoch + 1, 0
    loader = DataLoader(dataset, args.batch_size, sampler=indices(), num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # not the global RNG
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def learning_rate(step, args):
    """Linear warm-up, then constant, or cosine decay to lr / 10."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if not args.lr_decay:
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema_params, params, step, decay):
    """EMA of the weights; the decay warms up so that early averages are not mostly the init."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(net, diffusion, optimizer, scaler, params, x, y, args, dtype):
    """One update: loss under autocast, backward (scaled for fp16), unscale, clip, step.
    Returns (loss, bad): a non-finite loss or gradient skips the update."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = diffusion.loss(net, x, y, args.loss, args.min_snr)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    # fp16's scaler skips steps with inf gradients by itself; anything else non-finite is bad
    bad = not torch.isfinite(loss if scaler.is_enabled() else loss + grad_norm).item()
    if not bad:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), bad


def save_checkpoint(state, path, keep_previous=True):
    """Write atomically, keeping the last one as *.prev.pt: a crash at any moment of a save
    leaves a complete ckpt.pt, and a bad checkpoint still has a predecessor."""
    tmp, prev = path + ".tmp", path[:-3] + ".prev.pt"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        # link (or copy) the last one to *.prev.pt first: ckpt.pt never goes missing
        if keep_previous and os.path.exists(path):
            if os.path.exists(prev + ".tmp"):
                os.remove(prev + ".tmp")
            try:
                os.link(path, prev + ".tmp")
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, prev + ".tmp")
            os.replace(prev + ".tmp", prev)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk shows up as either
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = (e.strerror or e) if isinstance(e, OSError) else f"{e}; is the disk full?"
        intact = "; the previous checkpoint is intact" if keep_previous and os.path.exists(path) else ""
        raise OSError(f"could not write {path} ({reason}){intact}") from None


def writable(path, flag):
    """Make the file's folder and try the file, before the work that will write it."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path + ".tmp", "wb").close()
        os.remove(path + ".tmp")
    except OSError as e:
        raise OSError(f"cannot write to {flag} {path}: {e.strerror}") from None


def checkpoint(model, ema, optimizer, scaler, step, args, classes):
    """Everything a resume needs (and the class names, for sample.py --label): plain tensors,
    numbers, strings, lists and dicts only, so that it loads with torch.load(weights_only=True)."""
    for name, net in (("weights", model), ("EMA weights", ema)):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise FloatingPointError(f"the {name} are not finite at step {step}: checkpoint not written")
    device = model.conv_in.weight.device
    return {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "step": step, "model_config": config_dict(model.config),
        "diffusion": {"T": args.timesteps, "schedule": args.schedule, "objective": args.objective},
        "args": {k: list_or_value(v) for k, v in vars(args).items()}, "classes": list(classes),
        "rng": {"torch": torch.get_rng_state(),  # and the training GPU's alone: a resume may see fewer
                "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []},
    }


class Interrupt:
    """SIGINT / SIGTERM: finish the step, save, exit. A second Ctrl-C exits at once."""

    def __init__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the trainer acts
            return
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def save_grid(ema, diffusion, args, num_classes, path, device):
    """A fixed-seed grid from the EMA model: the same noise at every step of training."""
    n = 16 if num_classes == 0 else 10 * min(num_classes, 10)
    y = torch.arange(n, device=device) // 10 if args.class_cond else None  # a row per class
    shape = (n, ema.config.in_channels, args.image_size, args.image_size)
    # eta=1 (stochastic steps): early in training they give cleaner strokes than eta=0
    x = diffusion.ddim_sample(ema, shape, args.sample_steps, eta=1.0, y=y,
                              generator=torch.Generator().manual_seed(args.seed))
    save_image((x + 1) / 2, path, nrow=int(math.sqrt(n)) if num_classes == 0 else 10)


def train(args):
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = None
    if not args.resume and os.path.exists(ckpt_path):  # a forgotten --resume would overwrite it
        raise ValueError(f"{ckpt_path} exists: add --resume to continue that run, or give another "
                         "--out-dir (or delete that one) to start over")
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        if not {"model", "optimizer", "args"} <= ckpt.keys():
            raise ValueError(f"{ckpt_path} holds only EMA weights (an ema_fp16.pt export?): "
                             "it cannot resume training")
        args = resume_args(args, ckpt)
        if ckpt.get("step", 0) >= args.max_steps:
            raise ValueError(f"{ckpt_path} is at step {ckpt['step']}, and --max-steps is {args.max_steps}: "
                             "nothing to train; give a larger --max-steps")
    if args.sample_steps > args.timesteps:
        raise ValueError(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}")
    rank, world, device = setup(args)
    master = rank == 0
    if master:  # a bad --out-dir fails now, not at the first grid or save
        writable(os.path.join(args.out_dir, "samples", "step.png"), "--out-dir")
        writable(ckpt_path, "--out-dir")

    if not master:  # rank 0 loads first, alone: cifar10 and mnist download into one folder
        wait_for_all(world)
    dataset = load_dataset(args.dataset, args.data_dir, args.image_size, args.class_cond)
    if master:
        wait_for_all(world)
    args.image_size = dataset.image_size
    if args.class_cond and dataset.num_classes == 0:
        raise ValueError(f"--class-cond needs labels, and {args.dataset} has none")
    classes = dataset.classes if args.class_cond else []
    config = unet_config(args, dataset.channels, len(classes))
    check_image_size(args.image_size, config)
    now = config_dict(config)
    if ckpt is not None and now != ckpt["model_config"]:
        changed = [f"{k} {v} there, {now.get(k)} here" for k, v in ckpt["model_config"].items() if now.get(k) != v]
        raise ValueError(f"{ckpt_path} was trained on other data ({', '.join(changed)}): "
                         "resume with the --dataset and --data-dir it was trained on")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = UNet(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    diffusion = Diffusion(args.timesteps, args.schedule, args.objective, device)
    dtype = amp_dtype(args, device)
    optimizer, scaler = make_optimizer(model, args, device, dtype)
    step = 0
    torch.manual_seed(args.seed + rank)  # different noise on every rank
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt["scaler"]:  # empty unless the run that saved it used fp16
                scaler.load_state_dict(ckpt["scaler"])
            step = ckpt["step"]
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:  # e.g. another version's checkpoint
            raise ValueError(f"{ckpt_path} does not fit this train.py ({str(e).splitlines()[0]})") from None
        if world > 1:  # only rank 0's RNG state was saved: give each rank its own noise again
            torch.manual_seed(args.seed + rank + 1_000_003 * step)
        del ckpt
    net = model  # what the loop calls: compiled and DDP-wrapped; `model` stays the raw module
    if args.use_compile or (args.use_compile is None and device.type == "cuda"):
        net = torch.compile(net)
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"{args.dataset} ({len(dataset)} images, {args.image_size} px) | UNet with "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {device}, "
              f"{world} process(es), {dtype or torch.float32} | steps {step} -> {args.max_steps}")

    params, ema_params = list(model.parameters()), list(ema.parameters())
    data = batches(dataset, args, rank, world, step, device)
    interrupt, stop, bad_steps, loss_sum, last_log, t0 = Interrupt(), 0, 0, 0.0, step, time.time()
    t_log = t0
    try:
        while step < args.max_steps:
            if not bad_steps:  # after a skipped update the batch is tried again (new noise, new t):
                batch = next(data)  # step i always trains on batch i, as a resumed run expects
            x, y = batch
            if dataset.hflip:
                x = random_hflip(x)
            if args.class_cond:  # drop labels so the model also learns p(x) (Ho & Salimans 2022)
                y = torch.where(torch.rand(y.shape, device=device) < args.label_dropout, config.num_classes, y)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            loss, bad = train_step(net, diffusion, optimizer, scaler, params, x, y if args.class_cond else None,
                                   args, dtype)
            # every rank must skip, and stop, at the same step: one flag each, the max over ranks
            # (in fp16 the scaler takes an inf gradient for an overflow: only the rank with the
            # bad loss knows the step was bad)
            flags = torch.tensor([bad, interrupt.signum or 0])
            if world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            bad, stop = flags.tolist()
            if bad:
                bad_steps += 1
                print(f"step {step + 1}: non-finite loss or gradient, update skipped "
                      f"({bad_steps} in a row)", file=sys.stderr, flush=True)
                if bad_steps >= args.max_bad_steps:
                    raise FloatingPointError(f"{bad_steps} steps in a row with a non-finite loss or "
                                             f"gradient, up to step {step + 1}; stopped without saving")
                continue  # the step counter does not move
            bad_steps = 0
            update_ema(ema_params, params, step, args.ema_decay)
            step += 1
            loss_sum += loss

            if not master:
                if stop:
                    break
                continue
            if step % args.log_every == 0 or step == args.max_steps:
                now = time.time()  # speed since the last line: a slow first step (compiling) drops out
                elapsed, rate, t_log = now - t0, (step - last_log) / (now - t_log), now
                print(f"step {step}/{args.max_steps} | loss {loss_sum.item() / (step - last_log):.4f} | "
                      f"lr {learning_rate(step - 1, args):.2e} | {rate * args.batch_size * world:.1f} img/s | "
                      f"{elapsed / 60:.1f} min | ETA {(args.max_steps - step) / rate / 60:.1f} min", flush=True)
                loss_sum, last_log = 0.0, step
            if step % args.save_every == 0 or step == args.max_steps or stop:  # first: whatever the grid does
                save_checkpoint(checkpoint(model, ema, optimizer, scaler, step, args, classes), ckpt_path)
            if step % args.sample_every == 0 or step == args.max_steps:
                save_grid(ema, diffusion, args, config.num_classes,
                          os.path.join(args.out_dir, "samples", f"step_{step:07d}.png"), device)
            if stop:
                print(f"saved {ckpt_path} at step {step}; resume with --resume", file=sys.stderr)
                break
    finally:
        interrupt.restore()
        if world > 1:
            dist.destroy_process_group()
    if stop:  # a signal to any rank stops them all, and none of them claims to be done
        sys.exit(128 + stop)
    if master:  # the EMA weights alone, in fp16: a small file to sample from or share
        state = checkpoint(model, ema, optimizer, scaler, step, args, classes)
        export = os.path.join(args.out_dir, "ema_fp16.pt")
        save_checkpoint({"ema": {k: v.half() for k, v in state["ema"].items()},
                         **{k: state[k] for k in ("model_config", "diffusion", "args", "step", "classes")}},
                        export, keep_previous=False)
        print(f"done: {ckpt_path}, {export}")
    return model, ema


def main(argv=None):
    args = parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"  # one line each
    try:
        return train(args)
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message
    except KeyboardInterrupt:  # before the loop takes over Ctrl-C: nothing to save yet
        sys.exit(130)


if __name__ == "__main__":
    main()
