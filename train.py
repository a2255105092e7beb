"""
Train a DDPM. Each preset sets the model and optimisation for a dataset; flags override it.

    python train.py                                   # 5000 embedded MNIST digits (~12 min on a CPU)
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
import csv
import math
import os
import shutil
import sys
import time
import types

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image

import common
from data import DATASETS, batches, load_dataset, random_hflip
from diffusion import DEFAULT_ETA, DEFAULT_METHOD, Diffusion
from model import UNetConfig, build_unet, check_image_size, config_dict, load_checkpoint

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
    # recognizable digits after ~10 minutes on 2 CPU cores (see README)
    "mnist5k": dict(channels=(32, 64, 64), attention=(False, False, True), num_res=1, neck_length=1,
                    dropout=0.0, batch_size=64, lr=2e-3, warmup_steps=100, lr_decay=True,
                    max_steps=2000, log_every=50, sample_every=250, save_every=250),
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
# what the network and the diffusion are made of: the network of --init-from sets them, --resume keeps them
NETWORK_ARGS = ("layout", "channels", "attention", "num_res", "neck_length", "time_emb_dim", "timesteps",
                "schedule", "objective", "variance")
MODEL_ARGS = NETWORK_ARGS + ("dropout", "image_size", "class_cond")


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
        COMPILE=dict(dest="use_compile", action=argparse.BooleanOptionalAction), WORKERS=dict(type=int))


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
    common.at_least(p, args, 0, "warmup_steps", "weight_decay", "min_snr", "workers", "keep_every")
    for name in ("lr", "grad_clip"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be above 0")
    for name in ("label_dropout", "dropout", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 0 and below 1")
    if args.data_dir and args.dataset == "mnist5k":
        p.error("--data-dir has no use with the embedded mnist5k: for a folder of images, add --dataset folder")
    return args


def resume_args(args, ckpt):
    """A resumed run keeps the checkpoint's settings, but for the flags given now and the
    --out-dir it was found in; a flag that would change the network or the diffusion is an error."""
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}  # older ones hold lists
    changed = [n for n in MODEL_ARGS if n in args.explicit and saved.get(n) != getattr(args, n)]
    if changed:
        raise ValueError("the checkpoint was trained with other " + ", ".join(
            f"--{n.replace('_', '-')} ({common.as_typed(saved.get(n))} there, {common.as_typed(getattr(args, n))} here)"
            for n in changed))
    # a moved run folder keeps its outputs together; flags the checkpoint does not know take their defaults
    return argparse.Namespace(**{**vars(args), **saved, **{n: getattr(args, n) for n in args.explicit},
                                 "explicit": args.explicit, "out_dir": args.out_dir})


# ---------------------------------------------------------------- training helpers

def amp_dtype(args, device):
    """The autocast dtype, or None for plain fp32."""
    if args.dtype == "auto":  # bf16 on CUDA, or fp16 on GPUs without it
        return None if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]


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
def update_ema(ema_params, params, step, decay):
    """EMA of the weights; the decay warms up so that early averages are not mostly the init."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(net, diffusion, optimizer, scaler, params, x, y, args, dtype):
    """One update: loss under autocast, backward (scaled for fp16), unscale, clip, step. Returns
    (each image's loss, its t, the gradient norm, bad): a non-finite loss or gradient skips the update."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        losses, t = diffusion.loss(net, x, y, args.loss, args.min_snr)
        loss = losses.mean()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    # fp16's scaler skips steps with inf gradients by itself; anything else non-finite is bad
    bad = not torch.isfinite(loss if scaler.is_enabled() else loss + grad_norm).item()
    if not bad:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return losses.detach(), t, grad_norm, bad


def by_quarter(losses, t, T):
    """Sums of the losses, and counts, per quarter of the timestep range: (2, 4), where q0 is
    t < T/4 (fine detail, little noise) and q3 t >= 3T/4 (global structure, mostly noise)."""
    quarter = t * 4 // T
    return torch.zeros(2, 4, device=t.device).index_add_(1, quarter, torch.stack([losses, torch.ones_like(losses)]))


def checkpoint(run, step):
    """Everything a resume needs (and the class names, for sample.py --label): plain tensors,
    numbers, strings, lists and dicts only, so that it loads with torch.load(weights_only=True)."""
    for name, net in (("weights", run.model), ("EMA weights", run.ema)):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise FloatingPointError(f"the {name} are not finite at step {step}: checkpoint not written")
    args = run.args
    return {
        "model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "step": step, "model_config": config_dict(run.model.config),
        "diffusion": {"T": args.timesteps, "schedule": args.schedule, "objective": args.objective,
                      "variance": args.variance},
        "args": vars(args), "classes": list(run.classes),
        "rng": {"torch": torch.get_rng_state(),  # and the training GPU's alone: a resume may see fewer
                "cuda": [torch.cuda.get_rng_state(run.device)] if run.device.type == "cuda" else []},
    }


def ema_export(state):
    """The EMA weights alone, in fp16, with what sample.py needs: a small file to sample from or share."""
    return {"ema": {k: v.half() for k, v in state["ema"].items()},
            **{k: state[k] for k in ("model_config", "diffusion", "args", "step", "classes")}}


def save_checkpoint(state, path, keep_previous=True):
    """Write atomically, keeping the last one as *.prev.pt: a crash at any moment of a save
    leaves a complete ckpt.pt, and a bad checkpoint still has a predecessor."""
    prev = path[:-3] + ".prev.pt"
    try:
        with common.atomic_write(path, sync=True) as f:
            torch.save(state, f)
            if keep_previous and os.path.exists(path):  # the last one becomes *.prev.pt first:
                if os.path.exists(prev + ".tmp"):         # ckpt.pt never goes missing
                    os.remove(prev + ".tmp")
                try:
                    os.link(path, prev + ".tmp")
                except OSError:  # a filesystem without hard links
                    shutil.copyfile(path, prev + ".tmp")
                os.replace(prev + ".tmp", prev)
    except (OSError, RuntimeError) as e:  # torch.save raises either when the disk fills up
        reason = str(e) if isinstance(e, OSError) else f"could not write {path} ({e}; is the disk full?)"
        intact = "; the previous checkpoint is intact" if keep_previous and os.path.exists(path) else ""
        raise OSError(reason + intact) from None


def save_grid(ema, diffusion, args, num_classes, path, device):
    """A grid from the EMA model, the same noise at every step of training: the images of
    `python sample.py --nrow 4` (--label all --nrow 10 with classes) from this step's checkpoint."""
    n = 16 if num_classes == 0 else 10 * min(num_classes, 10)
    y = torch.arange(n, device=device) // 10 if args.class_cond else None  # a row per class
    x = diffusion.sample(ema, (n, ema.config.in_channels, args.image_size, args.image_size), DEFAULT_METHOD,
                         eta=DEFAULT_ETA, y=y, generator=[torch.Generator().manual_seed(args.seed + i) for i in range(n)])
    with common.atomic_write(path) as f:
        save_image((x + 1) / 2, f, format="png", nrow=int(math.sqrt(n)) if num_classes == 0 else 10)


class RunLog:
    """Rank 0's record of the run: a line per log interval on the terminal, the same values
    appended to OUT_DIR/log.csv and, with --wandb, logged to Weights & Biases with each grid."""
    FIELDS = ("step", "loss", "q0", "q1", "q2", "q3", "lr", "img_per_s", "grad_norm", "skipped", "minutes")

    def __init__(self, args, step, world):
        self.args, self.world, self.path, self.wandb = args, world, os.path.join(args.out_dir, "log.csv"), None
        if step and os.path.exists(self.path):  # resumed: the rows after the checkpoint's step are trained again
            with open(self.path) as f:
                rows = f.readlines()
            with common.atomic_write(self.path) as f:
                f.write("".join(rows[:1] + [r for r in rows[1:] if int(r.split(",")[0]) <= step]).encode())
        if args.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb needs the wandb package: pip install wandb") from None
            try:  # a resumed run continues its W&B run: the id is kept in the checkpoint's args
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_run_name, config=vars(args),
                                        id=getattr(args, "wandb_id", None), resume="allow", dir=args.out_dir)
            except Exception as e:
                raise ValueError(f"W&B did not start ({e}): run wandb login, or set WANDB_MODE=offline") from None
            args.wandb_id, self.image = self.wandb.id, wandb.Image
            self.wandb.define_metric("*", step_metric="step")
        self.step, self.t0, self.t_line = step, time.time(), time.time()

    def line(self, step, loss_sum, norm_sum, quarters, skipped):
        """The means over the steps since the last line, and the speed over them."""
        now, steps = time.time(), step - self.step
        rate, q = steps / (now - self.t_line), (quarters[0] / quarters[1]).tolist()
        row = dict(step=step, loss=loss_sum.item() / steps, q0=q[0], q1=q[1], q2=q[2], q3=q[3],
                   lr=learning_rate(step - 1, self.args), img_per_s=rate * self.args.batch_size * self.world,
                   grad_norm=norm_sum.item() / steps, skipped=skipped, minutes=(now - self.t0) / 60)
        print(f"step {step}/{self.args.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
              f"{row['img_per_s']:.1f} img/s | {row['minutes']:.1f} min | "
              f"ETA {(self.args.max_steps - step) / rate / 60:.1f} min", flush=True)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.wandb:
            self.wandb.log(row)
        self.step, self.t_line = step, now

    def grid(self, step, path):
        if self.wandb:
            self.wandb.log({"step": step, "samples": self.image(path)})

    def close(self):
        if self.wandb:
            self.wandb.finish()


# ---------------------------------------------------------------- the run

def resume(args, ckpt_path):
    """(args, checkpoint): with --resume the checkpoint and its settings, else (args, None)."""
    if not args.resume:
        if os.path.exists(ckpt_path):  # a forgotten --resume would overwrite it
            raise ValueError(f"{ckpt_path} exists: add --resume to continue that run, or give another "
                             "--out-dir (or delete that one) to start over")
        return args, None
    try:
        ckpt = load_checkpoint(ckpt_path)
    except ValueError as e:  # a corrupt ckpt.pt: say whether the one before it can take over
        prev = ckpt_path[:-3] + ".prev.pt"
        try:
            step = load_checkpoint(prev)["step"]
        except (ValueError, OSError, KeyError):
            raise e from None
        raise ValueError(f"{e}; {prev} (step {step}) is readable: resume from it with "
                         f"cp {prev} {ckpt_path} && python train.py --resume --out-dir {args.out_dir}") from None
    if not {"model", "optimizer", "args"} <= ckpt.keys():
        raise ValueError(f"{ckpt_path} holds only EMA weights (an ema_fp16.pt export?): it cannot resume training")
    args = resume_args(args, ckpt)
    if ckpt.get("step", 0) >= args.max_steps:
        raise ValueError(f"{ckpt_path} is at step {ckpt['step']}, and --max-steps is {args.max_steps}: "
                         "nothing to train; give a larger --max-steps")
    return args, ckpt


def init_from(args):
    """--init-from's checkpoint, its network's settings (and its image size, unless --image-size
    is given) put into args; None without the flag."""
    if not args.init_from:
        return None
    init, given = load_checkpoint(args.init_from), [n for n in NETWORK_ARGS if n in args.explicit]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is the network's own with --init-from: drop it")
    own = {"layout": "ours", "variance": "small", **init["model_config"], **init["diffusion"], "timesteps":
           init["diffusion"]["T"], "image_size": init["args"]["image_size"]}
    taken = NETWORK_ARGS + ("image_size",) * ("image_size" not in args.explicit)
    vars(args).update({n: tuple(v) if isinstance(v, list) else v for n, v in own.items() if n in taken})
    return init


def check_network(config, saved, what, hint):
    """Refuse weights (of a resumed or an --init-from checkpoint) of another network than `config`."""
    now = config_dict(config)
    changed = [f"{k} {v} there, {now.get(k)} here" for k, v in saved.items() if k != "dropout" and now.get(k) != v]
    if changed:
        raise ValueError(f"{what} ({', '.join(changed)}): {hint}")


def load_state(ckpt, path, run):
    """Put a checkpoint's weights, optimizer, scaler and RNG states into `run`; returns its step."""
    check_network(run.model.config, ckpt["model_config"], f"{path} was trained on other data",
                  "resume with the --dataset and --data-dir it was trained on")
    try:
        run.model.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty unless the run that saved it used fp16
            run.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if run.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], run.device)
        step = ckpt["step"]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # e.g. another version's checkpoint
        raise ValueError(f"{path} does not fit this train.py ({str(e).splitlines()[0]})") from None
    if run.world > 1:  # only rank 0's RNG state was saved: give each rank its own noise again
        torch.manual_seed(run.args.seed + run.rank + 1_000_003 * step)
    return step


def setup_run(args):
    """Everything the loop needs, new or from --resume's checkpoint, in one namespace."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    args, ckpt = resume(args, ckpt_path)
    init = init_from(args) if ckpt is None else None
    rank, world, device = common.setup(args.device)
    if rank == 0:  # a bad --out-dir fails now, not at the first grid or save
        for path in ("samples/step.png", "ckpt.pt") + ("snapshots/ema.pt",) * bool(args.keep_every):
            common.writable(os.path.join(args.out_dir, path), "--out-dir")
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
    check_image_size(args.image_size, config)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_unet(config).to(device)
    if init is not None:  # its EMA weights (a published network has only those)
        check_network(config, init["model_config"], f"--init-from {args.init_from} is a network for other images",
                      f"fine-tune it on images like its own (--dataset {args.dataset} differs)")
        model.load_state_dict(init["ema"])
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    dtype = amp_dtype(args, device)
    optimizer, scaler = make_optimizer(model, args, device, dtype)
    run = types.SimpleNamespace(args=args, rank=rank, world=world, device=device, dtype=dtype, dataset=dataset,
                                classes=classes, model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                                diffusion=Diffusion(args.timesteps, args.schedule, args.objective, device, args.variance),
                                ckpt_path=ckpt_path, step=0)
    torch.manual_seed(args.seed + rank)  # different noise on every rank
    if ckpt is not None:
        run.step = load_state(ckpt, ckpt_path, run)
    run.net = model  # what the loop calls: compiled and DDP-wrapped; `model` stays the raw module
    if args.use_compile or (args.use_compile is None and device.type == "cuda"):
        run.net = torch.compile(run.net)
    if world > 1:
        run.net = DDP(run.net, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        print(f"{args.dataset} ({len(dataset)} images, {args.image_size} px) | {type(model).__name__} with "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {device}, "
              f"{world} process(es), {dtype or torch.float32} | steps {run.step} -> {args.max_steps}")
    return run


def train(args):
    run = setup_run(args)
    args, step, model, ema = run.args, run.step, run.model, run.ema
    params, ema_params = list(model.parameters()), list(ema.parameters())
    data = batches(run.dataset, args.batch_size, args.seed, run.rank, run.world, step, run.device, args.workers)
    log = RunLog(args, step, run.world) if run.rank == 0 else None
    interrupt, stop, bad_steps, skipped, loss_sum, norm_sum, quarters = common.Interrupt(), 0, 0, 0, 0, 0, 0
    try:
        while step < args.max_steps:
            if not bad_steps:  # after a skipped update the batch is tried again (new noise, new t):
                batch = next(data)  # step i always trains on batch i, as a resumed run expects
            x, y = batch
            if run.dataset.hflip:
                x = random_hflip(x)
            if args.class_cond:  # drop labels so the model also learns p(x) (Ho & Salimans 2022)
                y = torch.where(torch.rand(y.shape, device=x.device) < args.label_dropout, len(run.classes), y)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(step, args)
            losses, t, grad_norm, bad = train_step(run.net, run.diffusion, run.optimizer, run.scaler, params, x,
                                                   y if args.class_cond else None, args, run.dtype)
            # every rank must skip, and stop, at the same step: one flag each, the max over ranks
            # (in fp16 the scaler takes an inf gradient for an overflow: only the rank with the
            # bad loss knows the step was bad)
            flags = torch.tensor([bad, interrupt.signum or 0])
            if run.world > 1:
                dist.all_reduce(flags, dist.ReduceOp.MAX)
            bad, stop = flags.tolist()
            if bad:
                bad_steps, skipped = bad_steps + 1, skipped + 1
                print(f"step {step + 1}: non-finite loss or gradient, update skipped "
                      f"({bad_steps} in a row)", file=sys.stderr, flush=True)
                if bad_steps >= args.max_bad_steps:
                    raise FloatingPointError(f"{bad_steps} steps in a row with a non-finite loss or "
                                             f"gradient, up to step {step + 1}; stopped without saving")
                continue  # the step counter does not move
            bad_steps = 0
            update_ema(ema_params, params, step, args.ema_decay)
            step += 1
            # summed on the device, read once a log line: no wait for the GPU at every step
            loss_sum, norm_sum = loss_sum + losses.mean(), norm_sum + grad_norm
            quarters = quarters + by_quarter(losses, t, args.timesteps)

            if run.rank > 0:  # only rank 0 logs, saves and samples
                if stop:
                    break
                continue
            if step % args.log_every == 0 or step == args.max_steps:
                log.line(step, loss_sum, norm_sum, quarters, skipped)
                skipped, loss_sum, norm_sum, quarters = 0, 0, 0, 0
            if step % args.save_every == 0 or step == args.max_steps or stop:  # first: whatever the grid does
                save_checkpoint(checkpoint(run, step), run.ckpt_path)
            if args.keep_every and step % args.keep_every == 0:  # a history to sample from and score (fid.py)
                save_checkpoint(ema_export(checkpoint(run, step)), os.path.join(args.out_dir, "snapshots",
                                                                           f"ema_{step:07d}.pt"), keep_previous=False)
            if step % args.sample_every == 0 or step == args.max_steps:
                grid = os.path.join(args.out_dir, "samples", f"step_{step:07d}.png")
                save_grid(ema, run.diffusion, args, len(run.classes), grid, run.device)
                log.grid(step, grid)
            if stop:
                print(f"saved {run.ckpt_path} at step {step}; resume with --resume", file=sys.stderr)
                break
    finally:
        interrupt.restore()
        if log:
            log.close()
        if run.world > 1:
            dist.destroy_process_group()
    if stop:  # a signal to any rank stops them all, and none of them claims to be done
        sys.exit(128 + stop)
    if run.rank == 0:
        export = os.path.join(args.out_dir, "ema_fp16.pt")
        save_checkpoint(ema_export(checkpoint(run, step)), export, keep_previous=False)
        print(f"done: {run.ckpt_path}, {export}")
    return model, ema


def main(argv=None):
    return common.run(train, parse_args(argv), errors=(ValueError, OSError, FloatingPointError))


if __name__ == "__main__":
    main()
