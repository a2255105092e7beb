"""
Sample from a trained DDPM: a grid PNG, a GIF of the denoising, or many images for FID.

    python sample.py                                    # 8x8 grid, SDE-DPM-Solver++ 50 steps, EMA weights
    python sample.py --method ddpm --ema --nrow 4       # ancestral sampling over all T steps
    python sample.py --method dpm --steps 20 --gif out/denoise.gif
    python sample.py --label all --guidance 2           # class-conditional: one row per class
    python sample.py --num-samples 50000 --npz samples.npz   # for FID (--png-dir DIR for PNGs)
    torchrun --standalone --nproc_per_node=8 sample.py --num-samples 50000 --npz samples.npz

Image i is drawn from seed + i alone, so the same seed gives the same images whatever the
batch size, and a long export can be split or resumed with --first (torchrun splits it over
its processes by itself).
"""
import contextlib
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

import checkpoint
import common
from data import to_uint8
from diffusion import DEFAULT_ETA, DEFAULT_METHOD, Diffusion, generators

CKPT = "out/ckpt.pt"  # a training checkpoint, its ema_fp16.pt export, or a published network (google/ddpm-*, a folder)
METHOD = DEFAULT_METHOD  # ddpm (all T steps) | ddim | dpm (DPM-Solver++ 2M)
STEPS = None  # None = 100 for ddim, 50 for dpm (fewer for a small T); ddpm always takes T
ETA = DEFAULT_ETA  # ddim and dpm: 0 solves the ODE (deterministic), 1 the SDE (fresh noise each step)
SPACING = "linear"  # ddim and dpm timesteps: linear | quadratic (dense near t=0) | logsnr (even in log-SNR)
VARIANCE = None  # ddpm: small (Ho et al.'s posterior beta-tilde) | large (beta_t); None = the model's own
EMA = True  # sample with the EMA weights
NROW = 8  # the grid is NROW x NROW images (NROW per class with --label all)
SEED = 0  # image i is drawn from seed + i
LABEL = None  # class-conditional models: a class index or name, or "all" for one row per class
GUIDANCE = 1.0  # classifier-free guidance scale: 1 = conditional, 0 = unconditional
OUT = None  # grid PNG; None = sample_<method>.png beside the checkpoint
GIF = None  # also write an animated GIF of the denoising here
NUM_SAMPLES = None  # export mode: this many images to --npz and/or --png-dir
NPZ = None  # uint8 NHWC under key arr_0 (the ADM evaluation suite's format)
PNG_DIR = None  # numbered PNGs (pytorch-fid, clean-fid)
FIRST = 0  # index of the first image to export
BATCH_SIZE = 64  # images per batch when exporting
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps


# the flags fid.py takes from here, so that a score is of the images sample.py draws
SAMPLER = ("METHOD", "STEPS", "ETA", "SPACING", "VARIANCE", "EMA", "SEED", "LABEL", "GUIDANCE", "BATCH_SIZE",
           "DEVICE")


def add_flags(p, only=None, defaults=None):
    """A flag per constant above (or per name in `only`), its comment the help, its default the constant's."""
    return common.add_flags(p, globals(), defaults and {**globals(), **defaults}, only,
                            METHOD=dict(choices=("ddpm", "ddim", "dpm")),
                            SPACING=dict(choices=("linear", "quadratic", "logsnr")),
                            VARIANCE=dict(choices=("small", "large")), STEPS=dict(type=int), NUM_SAMPLES=dict(type=int))


def check_sampler(p, args):
    """Refuse sampler flags that cannot work together."""
    common.at_least(p, args, 1, "steps", "batch_size")
    common.check(p, args, lambda v: 0 <= v <= 1, "between 0 and 1", "eta")
    if args.method == "ddpm" and (args.steps is not None or args.eta != 1 or args.spacing != "linear"):
        p.error("--method ddpm takes every step (all T), with eta 1: --steps, --eta and --spacing are for ddim and dpm")
    if args.variance and args.method != "ddpm":
        p.error("--variance applies to --method ddpm (ddim and dpm set theirs with --eta)")
    common.check(p, args, math.isfinite, "a finite number", "guidance")
    if args.guidance != 1 and args.label is None:
        p.error("--guidance needs --label (a class index, a class name or all)")


def parse_args(argv=None):
    """The flags, checked."""
    p = add_flags(common.parser(__doc__))
    args = p.parse_args(argv)
    check_sampler(p, args)
    common.at_least(p, args, 1, "nrow", "num_samples")
    common.at_least(p, args, 0, "first")
    if (args.npz or args.png_dir or args.first) and args.num_samples is None:
        p.error("--npz, --png-dir and --first need --num-samples")
    if args.num_samples is not None and not (args.npz or args.png_dir):
        p.error("--num-samples needs --npz and/or --png-dir to write the images to")
    if args.num_samples is not None and (args.out or args.gif):
        p.error("--out and --gif write a grid: drop them with --num-samples")
    if args.npz and os.path.isdir(args.npz):
        p.error(f"--npz {args.npz} is a folder: give a file name, e.g. {os.path.join(args.npz, 'samples.npz')}")
    if args.out and Image.registered_extensions().get(os.path.splitext(args.out)[1].lower()) not in Image.SAVE:
        p.error(f"--out {args.out}: use an image file name, e.g. grid.png")
    if args.gif and not args.gif.lower().endswith(".gif"):
        p.error(f"--gif {args.gif}: the file name must end in .gif")
    return args


def parse_label(label, classes):
    """None, 'all', or a class index, from an index or a class name (the checkpoint's)."""
    if label is None:
        return None
    if not classes:
        raise ValueError("--label needs a class-conditional model (train.py --class-cond)")
    if label == "all":
        return "all"
    if label in classes and not label.isdigit():  # digits are an index, even where a class is named "3"
        return classes.index(label)
    if not label.isdigit() or int(label) >= len(classes):
        names = ", ".join(classes) if len(classes) <= 20 else f"{classes[0]}, ..., {classes[-1]}"
        raise ValueError(f"--label must be 'all', a class index 0..{len(classes) - 1} or a class name "
                         f"({names}), not {label!r}")
    return int(label)


def to_pil_grid(x, nrow):
    """[-1, 1] NCHW floats -> one image of them, nrow to a row, 2 px apart."""
    grid = make_grid(to_uint8(x).permute(0, 3, 1, 2), nrow=nrow, padding=2)
    return Image.fromarray(grid.permute(1, 2, 0).numpy().squeeze())


def generate(diffusion, model, args, indices, label, callback=None, per_class=1, **given):
    """Images indices[0..] (each from its own seed), from the sampler args.method picks, with `label`:
    None, one class for all, or "all", every class in turn, per_class images each. `given` goes to
    diffusion.sample (an image to start from, and its start or mask, for edit.py)."""
    c = model.config
    labels = None if label is None else torch.tensor(
        [i // per_class % c.num_classes if label == "all" else label for i in indices], device=diffusion.betas.device)
    shape = (len(indices), c.in_channels, args.image_size, args.image_size)
    return diffusion.sample(model, shape, args.method, args.steps, args.eta, args.spacing, args.variance,
                            generator=generators(args.seed, indices), y=labels, guidance=args.guidance,
                            callback=callback, **given)


def images(diffusion, model, args, indices, label):
    """Images indices[0..] as uint8 NHWC on the CPU, with `label` (see generate)."""
    if not indices:
        return torch.empty(0, args.image_size, args.image_size, model.config.in_channels, dtype=torch.uint8)
    return to_uint8(generate(diffusion, model, args, indices, label))


def rounds(first, num_samples, batch_size, world):
    """Image indices first.. in rounds of one batch per process: [range for rank 0, rank 1, ...]."""
    end = first + num_samples
    for start in range(first, end, batch_size * world):
        yield [range(min(i, end), min(i + batch_size, end))
               for i in range(start, start + batch_size * world, batch_size)]


def sample_grid(diffusion, model, args, label, name="sample", progress=True, **given):
    """One grid PNG (and a GIF of the denoising when asked), by default name_<method>.png beside
    the checkpoint, with a progress bar unless told; `given` goes to generate. Returns the PNG's path."""
    num_classes, nrow = model.config.num_classes, args.nrow
    n = nrow * (num_classes if label == "all" else nrow)  # "all": a row per class
    if n > 1024:  # one batch
        raise ValueError(f"a grid of {n} images is more than one batch should hold: use a smaller "
                         "--nrow, or --num-samples with --npz or --png-dir for many images")
    out = args.out or os.path.join(beside(args.ckpt), f"{name}_{args.method}.png")
    common.writable(("--out", out), ("--gif", args.gif))
    frames, bar = [], tqdm(desc=f"{args.method} x {n} images", unit="step", file=sys.stderr, disable=not progress)

    def callback(i, steps, x, x0):
        bar.total = steps
        bar.update(1)
        if args.gif and i in np.linspace(0, steps - 1, min(steps, 80)).round():  # ~80 GIF frames
            frames.append(to_pil_grid(x.clamp(-1, 1), nrow))

    x = generate(diffusion, model, args, range(n), label, callback, per_class=nrow, **given)
    bar.close()
    common.save_image(to_pil_grid(x, nrow), out)
    if args.gif:  # about 3 s of denoising whatever the step count, then the last frame held for 2 s
        durations = [max(40, 3000 // len(frames))] * (len(frames) - 1) + [2000]
        common.save_image(frames[0], args.gif, frames[1:], durations)
        print(args.gif)
    return out


def beside(ckpt):
    """The folder of a checkpoint file or folder, where its grids go; "." for a hub name."""
    return (os.path.dirname(ckpt) if os.path.exists(ckpt) else "") or "."


def export(diffusion, model, args, label, rank, world):
    """--num-samples images from --first, a batch at a time, to an .npz and/or numbered PNGs.
    Under torchrun the processes take the batches in turn and rank 0 gathers them into the npz;
    image i is still drawn from seed + i."""
    shape = (args.num_samples, args.image_size, args.image_size, model.config.in_channels)
    common.writable(("--png-dir", args.png_dir and os.path.join(args.png_dir, f"{args.first:06d}.png")),
                    ("--npz", rank == 0 and args.npz))
    writer = common.npz_writer(args.npz, shape) if args.npz and rank == 0 else contextlib.nullcontext()
    with writer as npz, tqdm(total=args.num_samples, unit="img", file=sys.stderr, disable=rank > 0) as bar:
        done = args.first  # with one process: the PNGs before this one are written
        try:
            for turn in rounds(args.first, args.num_samples, args.batch_size, world):
                batch = images(diffusion, model, args, turn[rank], label)
                for i, image in zip(turn[rank], batch if args.png_dir else []):
                    path = os.path.join(args.png_dir, f"{i:06d}.png")
                    common.save_image(Image.fromarray(image.numpy().squeeze()), path)
                    done = i + 1
                if args.npz and world > 1:
                    batch = common.gather(batch, [len(indices) for indices in turn], args.batch_size)
                if npz is not None:
                    npz.write(batch.numpy().tobytes())
                bar.update(sum(len(indices) for indices in turn))
        except (OSError, KeyboardInterrupt) as e:  # say what there is to go on from
            go_on = (f"images {args.first}..{done - 1} are in {args.png_dir}; go on with --first {done} --num-samples "
                     f"{args.first + args.num_samples - done}") if world == 1 and done > args.first else None
            if isinstance(e, OSError):
                raise OSError("; ".join(filter(None, [str(e), go_on]))) from None
            bar.close()
            if go_on or (world == 1 and args.npz):
                print(f"\ninterrupted: {go_on or f'{args.npz} is written only once all images are done'}",
                      file=sys.stderr)
            raise
    return args.npz or args.png_dir


def load(path, args, device):
    """(network with the EMA or raw weights, diffusion, label, checkpoint) from checkpoint `path`,
    on `device`; sets args.image_size."""
    ckpt = checkpoint.load(path, full=None if args.ema else "drop --no-ema")
    model = checkpoint.network(ckpt, ema=args.ema).to(device).eval()
    diffusion = Diffusion(**ckpt["diffusion"], device=device)  # a published network's: its variance and clipping too
    most = diffusion.T - (args.method == "dpm")  # every timestep; DPM-Solver lands on t = 0 unevaluated
    if (args.steps or 0) > most:
        raise ValueError(f"--steps {args.steps} is more than --method {args.method} can take with the model's "
                         f"T={diffusion.T} (at most {most})")
    args.image_size = ckpt["args"]["image_size"]
    classes = ckpt.get("classes") or [str(i) for i in range(model.config.num_classes)]
    return model, diffusion, parse_label(args.label, classes), ckpt


def sample(args):
    rank, world, device = common.setup(args.device)
    if world > 1 and not args.num_samples:
        raise ValueError("under torchrun, sample.py exports (--num-samples with --npz or "
                         "--png-dir); a grid takes one process")
    model, diffusion, label, _ = load(args.ckpt, args, device)
    if args.num_samples:
        path = export(diffusion, model, args, label, rank, world)
    else:
        path = sample_grid(diffusion, model, args, label)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        print(path)
    return path


def main(argv=None):
    return common.run(sample, parse_args(argv))


if __name__ == "__main__":
    main()
