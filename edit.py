"""
Edit your own images with a trained model, no retraining: variations, inpainting, interpolation.

    python edit.py --image photo.png --strength 0.5           # a grid of variations (SDEdit)
    python edit.py --image photo.png --mask mask.png          # inpainting: white in the mask is redrawn
    python edit.py --image a.png --image b.png --frames 8     # a strip from a to b (--gif for a GIF)

Variations (Meng et al. 2021) noise the image to t0 = strength * T with q(x_t | x_0) and
denoise it from there: strength 0 gives the image back, 1 an unconditional sample, and --steps
counts the steps from t0 down, so a small strength still takes that many. Inpainting is
RePaint (Lugmayr et al. 2022); the known pixels end exactly as they are in the image.
Interpolation inverts both images to x_T with DDIM run backwards (Song et al. 2021 sec. 4.3),
walks between the two on the sphere (slerp, sec. 5.3; lerp would shrink the noise) and
decodes each frame with DDIM. Images are converted to the model's channels, then resized and
centre-cropped to its size. A grid's edit i is drawn from seed + i, as sample.py draws image i.
"""
import os
import sys

import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError

import common
import sample
from data import from_uint8, to_uint8

IMAGE = []  # the image to edit (PNG, JPEG, ...); give --image twice to interpolate between two
STRENGTH = None  # variations: how far to noise the image, 0..1; None = 0.5
MASK = None  # inpainting: an image of the same shape, white where the image is redrawn, black where it is kept
JUMP_LENGTH = 10  # inpainting: RePaint goes back this many steps ...
JUMP_N_SAMPLE = 10  # ... this many times in all (1 = never), every JUMP_LENGTH steps
FRAMES = None  # interpolation: frames in the strip, both images included; None = 8

# the sampler of each mode unless told: variations draw as sample.py does, RePaint takes the
# paper's 250 ancestral steps (DDIM, eta 1), interpolation is deterministic DDIM both ways
MODES = {"variations": dict(method=sample.METHOD, eta=sample.ETA, steps=None),
         "inpainting": dict(method="ddim", eta=1.0, steps=250), "interpolation": dict(method="ddim", eta=0.0, steps=100)}


def parse_args(argv=None):
    """The flags above, then sample.py's (checkpoint, sampler, grid); --method, --eta and --steps
    default to the mode's own (MODES)."""
    modes = "; ".join(f"{mode}: {', '.join(f'--{k} {v}' for k, v in d.items() if v is not None)}" for mode, d in MODES.items())
    p = common.add_flags(common.parser(__doc__, f"Each mode's sampler unless told otherwise: {modes}."), globals(),
                         IMAGE=dict(action="append", type=str), STRENGTH=dict(type=float), FRAMES=dict(type=int))
    p = sample.add_flags(p, ("CKPT", *sample.SAMPLER[:-2], "NROW", "OUT", "GIF", "DEVICE"),
                         defaults={"METHOD": None, "ETA": None, "NROW": 4})
    args = p.parse_args(argv)
    if not 1 <= len(args.image) <= 2:
        p.error("give --image once (variations, inpainting) or twice (interpolation)")
    args.mode = "interpolation" if len(args.image) == 2 else "inpainting" if args.mask else "variations"
    args.method = args.method or MODES[args.mode]["method"]
    args.eta = MODES[args.mode]["eta"] if args.eta is None else args.eta
    if args.mode == "interpolation" and args.mask or args.mode != "variations" and args.strength is not None:
        p.error("--mask and --strength edit one image, and not together: --strength makes variations, --mask inpaints")
    if args.mode != "interpolation" and args.frames is not None:
        p.error("--frames needs two images: give --image twice")
    if args.mode == "inpainting" and args.method == "dpm":  # RePaint steps back, past DPM-Solver's history
        p.error("inpainting takes --method ddim or ddpm")
    if args.mode == "interpolation" and (args.method != "ddim" or args.eta != 0):
        p.error("interpolation runs DDIM both ways, deterministic: drop --method and --eta")
    common.check(p, args, lambda v: 0 <= v <= 1, "between 0 and 1", "strength")
    args.strength = 0.5 if args.strength is None else args.strength
    args.frames = 8 if args.frames is None else args.frames
    common.at_least(p, args, 1, "jump_length", "jump_n_sample", "nrow")
    common.at_least(p, args, 2, "frames")
    sample.check_sampler(p, args)
    return args


def read_image(path, flag, size, grey, mask=False):
    """An image file as the model takes it, (1, C, size, size) in [-1, 1], or a mask as 0 / 1:
    converted, resized (nearest neighbour for a mask, which stays binary) and centre-cropped;
    and the file's own width and height."""
    try:
        with Image.open(path) as f:
            image, mode = f.convert("L" if grey or mask else "RGB"), f.mode
    except (UnidentifiedImageError, OSError) as e:
        reason = "no such file" if isinstance(e, FileNotFoundError) else f"not an image that can be read ({e})"
        raise ValueError(f"{flag} {path}: {reason}") from None
    if image.size != (size, size) or mode != image.mode:
        print(f"{flag} {path}: {image.size[0]}x{image.size[1]} {mode}, taken as {size}x{size} "
              f"{'grey' if grey else 'RGB'} (resized, centre-cropped)", file=sys.stderr)
    interpolation = TF.InterpolationMode.NEAREST if mask else TF.InterpolationMode.BICUBIC
    x = TF.pil_to_tensor(TF.center_crop(TF.resize(image, size, interpolation, antialias=not mask), size))[None]
    return (x > 127).float() if mask else from_uint8(x), image.size


def slerp(a, b, w):
    """Spherical interpolation from a (w = 0) to b (w = 1), per image: the norm stays that of
    the endpoints, as a Gaussian's does, where lerp's midpoint has 0.71 of it for independent a, b."""
    cos = (a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))
    theta = cos.clamp(-1, 1).acos().view(-1, *[1] * (a.dim() - 1))
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


def interpolate(diffusion, model, args, images, label, device):
    """A strip of args.frames images from the first image to the second, and a GIF of it with
    --gif; returns the strip's path."""
    if label == "all":
        raise ValueError("interpolation draws one strip: give --label one class, not all")
    y = None if label is None else torch.full((args.frames,), label, device=device)
    latents = diffusion.ddim_invert(model, images, args.steps, None if y is None else y[:2], args.guidance)
    x = slerp(latents[:1], latents[1:], torch.linspace(0, 1, args.frames, device=device).view(-1, 1, 1, 1))
    frames = diffusion.ddim_sample(model, x.shape, args.steps, x=x, y=y, guidance=args.guidance)
    error = (to_uint8(frames[[0, -1]]).float() - to_uint8(images).float()).abs().mean(dim=(1, 2, 3))
    print(f"inversion round trip at {args.steps} steps: mean |error| {error[0]:.1f} and {error[1]:.1f} of 255 "
          "at the ends (more --steps, less)", file=sys.stderr)
    out = args.out or os.path.join(sample.beside(args.ckpt), "interpolation.png")
    common.writable(("--out", out), ("--gif", args.gif))
    common.save_image(sample.to_pil_grid(frames, args.frames), out)
    if args.gif:  # there and back, 0.2 s a frame
        strip = [sample.to_pil_grid(frame[None], 1) for frame in torch.cat([frames, frames.flip(0)[1:-1]])]
        common.save_image(strip[0], args.gif, strip[1:], [200] * len(strip))
        print(args.gif)
    return out


def edit(args):
    _, _, device = common.setup(args.device)
    model, diffusion, label, _ = sample.load(args.ckpt, args, device)
    args.steps = args.steps or MODES[args.mode]["steps"]  # after load, which checks only a --steps given against T
    grey = model.config.in_channels == 1
    images, sizes = zip(*[read_image(path, "--image", args.image_size, grey) for path in args.image])
    images = torch.cat(images).to(device)  # one, or the two ends of a strip
    if args.mode == "interpolation":
        return interpolate(diffusion, model, args, images, label, device)
    if args.mode == "inpainting":
        args.steps = min(args.steps, diffusion.T)
        mask, (w, h) = read_image(args.mask, "--mask", args.image_size, grey, mask=True)
        if abs(w / h - sizes[0][0] / sizes[0][1]) > 0.01:  # it would be cropped otherwise than the image
            raise ValueError(f"--mask {args.mask} is {w}x{h} and --image {args.image[0]} {sizes[0][0]}x{sizes[0][1]}: "
                             "give a mask of the image's shape")
        return sample.sample_grid(diffusion, model, args, label, "inpainting", x0=images,
                                  mask=mask.to(device), jump=(args.jump_length, args.jump_n_sample))
    start = round(args.strength * diffusion.T) - 1  # t0 = strength * T, counted from 0
    steps = args.steps or diffusion.default_steps(args.method)  # from t0 down: at most t0 + 1 (t0 for dpm)
    args.steps = max(1, min(steps, start + (args.method != "dpm")))
    return sample.sample_grid(diffusion, model, args, label, "variations", x0=images, start=start)


def main(argv=None):
    path = common.run(edit, parse_args(argv))
    print(path)
    return path


if __name__ == "__main__":
    main()
