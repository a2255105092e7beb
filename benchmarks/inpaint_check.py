"""
How often inpainting keeps a digit what it was, on the quick-start model: the lower half of
mnist5k's 200 held-out digits (20 of each class) is redrawn by RePaint, by plain replacement
(RePaint that never goes back: jump_n_sample 1) and filled with black, and fid.py's digit
classifier, which did not train on those digits, names each result. 54 minutes on 2 CPU
cores shared with other runs (RePaint takes 2410 network evaluations a digit).

    python benchmarks/inpaint_check.py --ckpt out/ckpt.pt
"""
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's files
import common
import fid
import sample
from data import from_uint8, load_dataset, to_uint8
from diffusion import generators

CKPT = "out/ckpt.pt"  # a checkpoint of 28-px digits (python train.py)
STEPS = 250  # RePaint's steps (ddim, eta 1), as edit.py takes them
SEED = 0  # digit i is redrawn from seed + i
CACHE_DIR = "data/fid_stats"  # where fid.py keeps its digit classifier
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps


def check(args):
    _, _, device = common.setup(args.device)
    args.ema, args.label, args.method = True, None, "ddim"  # as sample.load reads them
    model, diffusion, _, _ = sample.load(args.ckpt, args, device)
    if (model.config.in_channels, args.image_size) != (1, 28):
        raise ValueError(f"{args.ckpt} does not draw 28-px digits: train it with python train.py")
    classifier = fid.digit_classifier(args.cache_dir, device)[0]
    digits, held_out = load_dataset("mnist5k"), fid.held_out_digits()
    images, labels = digits.images[held_out].to(device), digits.labels[held_out].to(device)
    x0, mask = from_uint8(images), torch.zeros(1, 1, 28, 28, device=device)
    mask[:, :, 14:] = 1  # redraw the lower half
    filled = {"the digits as they are": x0, "lower half black (zero fill)": x0 * (1 - mask) - mask}
    for name, resamplings in (("plain replacement", 1), ("RePaint (jump length 10, 10 resamplings)", 10)):
        with tqdm(desc=name, unit="step", file=sys.stderr) as bar:
            filled[name] = diffusion.sample(
                model, x0.shape, "ddim", args.steps, 1.0, x0=x0, mask=mask, jump=(10, resamplings),
                generator=generators(args.seed, range(len(x0))),
                callback=lambda i, steps, x, pred: (setattr(bar, "total", steps), bar.update(1)))
    rates = {}
    for name, x in filled.items():
        predicted = classifier(to_uint8(x).permute(0, 3, 1, 2))[1].argmax(1)
        rates[name] = (predicted == labels).float().mean().item()
        print(f"{name}: the classifier names {rates[name]:.1%} of {len(x)} digits as they were", flush=True)
    return rates


def main(argv=None):
    p = common.add_flags(common.parser(__doc__), globals())
    return common.run(check, p.parse_args(argv))


if __name__ == "__main__":
    main()
