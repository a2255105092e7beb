"""
Score samples as the papers do: FID (Heusel et al. 2017) and Inception Score (Salimans et al.
2016), from torch-fidelity's port of the TensorFlow Inception v3 that the papers' numbers
come from (it matches the original TensorFlow FID and IS code to machine precision).

    python fid.py --ckpt out/ckpt.pt                                   # 10000 samples, DDIM 100, EMA
    python fid.py --ckpt out/ckpt.pt --num-samples 50000 --method ddpm  # the DDPM paper's protocol
    python fid.py --ckpt "out/snapshots/*.pt" --method dpm --steps 20   # a row per snapshot
    python fid.py --npz samples.npz --ref cifar10                      # an export of sample.py
    python fid.py --png-dir samples/ --ref data/fid_stats/cifar10-32px-inception-2015-12-05.npz
    python fid.py --ckpt out/ckpt.pt --features digits --num-samples 1000   # MNIST, no download

The reference is the training set of the checkpoint's dataset, read by data.py as training
read it. Its statistics are computed once and cached in --cache-dir, keyed by dataset, image
size and Inception weights, so that a second run only samples. Image i is drawn from
seed + i, as sample.py draws it, so a score is reproducible.
"""
import glob
import hashlib
import io
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from tqdm import tqdm

import common
import sample
from data import DATASETS, ArrayDataset, from_uint8, image_files, load_dataset, to_uint8

CKPT = None  # checkpoints to sample from: a file, or a glob in quotes ("out/snapshots/*.pt"), a row each
NPZ = None  # or score an export: uint8 images N x H x W x C under arr_0 (sample.py --npz)
PNG_DIR = None  # or score a folder of images (sample.py --png-dir)
REF = None  # None = the checkpoint's training set; or a dataset name, a folder, an .npz of images or statistics
DATA_DIR = None  # where the reference dataset is; None = where the checkpoint was trained from
NUM_SAMPLES = 10000  # images drawn per checkpoint (50000 for the papers' numbers)
WEIGHTS = None  # torch-fidelity's Inception weights file; None = download once into TORCH_HOME
FEATURES = "inception"  # inception (the papers' FID and IS) | digits (a digit classifier's, for MNIST models)
CACHE_DIR = "data/fid_stats"  # reference statistics, computed once per dataset, image size and weights
ISC_SPLITS = 10  # the Inception Score's mean and std are over this many splits of the images


def parse_args(argv=None):
    """The flags above, then sample.py's sampler flags."""
    p = common.add_flags(common.parser(__doc__), globals(), FEATURES=dict(choices=("inception", "digits")))
    p = sample.add_flags(p, only=sample.SAMPLER)
    args = p.parse_args(argv)
    sample.check_sampler(p, args)
    common.at_least(p, args, 2, "num_samples", "isc_splits")
    if sum(source is not None for source in (args.ckpt, args.npz, args.png_dir)) != 1:
        p.error("give one of --ckpt, --npz or --png-dir")
    if args.ckpt is None and args.ref is None:
        p.error("--npz and --png-dir need --ref: a dataset name, a folder, or an .npz of images or statistics")
    if args.ref is not None and args.ref not in DATASETS and not os.path.exists(args.ref):
        p.error(f"--ref {args.ref}: not a dataset ({', '.join(DATASETS)}), a folder or an .npz")
    return args


class Digits(torch.nn.Module):
    """A small MNIST classifier (a convnet of two 3x3 layers): its 128 penultimate features
    stand in for Inception's pool features, which are made for 299-px photos, not 28-px digits,
    and its logits for Inception's in the IS. Takes uint8 images, as torch-fidelity's network."""

    def __init__(self):
        super().__init__()
        conv = lambda i, o: [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        self.body = torch.nn.Sequential(*conv(1, 32), *conv(32, 64), torch.nn.Flatten(),
                                        torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        x = from_uint8(x[:, :1])  # grey; a larger MNIST (32 px) loses its padded border
        x = x[:, :, (x.shape[2] - 28) // 2:, (x.shape[3] - 28) // 2:][:, :, :28, :28]
        features = self.body(x)
        return features, self.head(features)


def held_out_digits():
    """mnist5k's last 20 digits of each class (200), which the digit classifier does not train on."""
    labels = load_dataset("mnist5k").labels
    return torch.cat([torch.nonzero(labels == c).flatten()[-20:] for c in range(10)])


def digit_classifier(cache_dir, device):
    """A Digits net trained on mnist5k's digits but the held-out ones (5 epochs, about a minute
    on a CPU), cached in `cache_dir`, and the name of its weights."""
    path = os.path.join(cache_dir, "digits-classifier.pt")
    if not os.path.exists(path):
        common.writable(("--cache-dir", path))
        data, net = load_dataset("mnist5k"), Digits()
        train = torch.ones(len(data), dtype=torch.bool).index_fill_(0, held_out_digits(), False)
        images, labels = data.images[train], data.labels[train]
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        for epoch in tqdm(range(5), desc="training the digit classifier", file=sys.stderr):
            for batch in torch.randperm(len(images)).split(64):
                loss = torch.nn.functional.cross_entropy(net(images[batch])[1], labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with common.atomic_write(path) as f:
            torch.save(net.state_dict(), f)
    with open(path, "rb") as f:  # read once: the bytes hashed are the bytes loaded
        data = f.read()
    net = Digits()
    net.load_state_dict(common.safe_load(io.BytesIO(data), path, "digit classifier"))
    return net.to(device).eval(), "digits-" + hashlib.sha256(data).hexdigest()[:8]


def inception(weights, device):
    """torch-fidelity's Inception v3, which gives 2048 pool features (for FID) and 1008 logits
    (for IS), and a name for its weights (the standard ones, or a file's hash)."""
    tag, data = "inception-2015-12-05", None
    if weights:  # read once and checked: torch-fidelity unpickles the very bytes that passed
        try:
            with open(weights, "rb") as f:
                data = f.read()
        except OSError as e:
            raise OSError(f"cannot read --weights {weights}: {e.strerror}") from None
        common.safe_load(io.BytesIO(data), f"--weights {weights}", "weights file")
        tag = "weights-" + hashlib.sha256(data).hexdigest()[:8]
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=data and io.BytesIO(data))
    except OSError as e:  # no network
        raise OSError(f"could not download the Inception weights ({e}): on a machine without network, fetch "
                      f"{URL_INCEPTION_V3} elsewhere and give --weights FILE") from None
    except RuntimeError as e:
        raise ValueError(f"--weights {weights} are not torch-fidelity's Inception v3 ({str(e)[:200]})") from None
    return net.to(device).eval(), tag


def extractor(args, device):
    """The network whose features FID compares, and the name of its weights."""
    if args.features == "digits":
        return digit_classifier(args.cache_dir, device)
    return inception(args.weights, device)


@torch.no_grad()
def features(net, batches, total, device, what):
    """(Inception features, logits, seconds in the network) of uint8 N x H x W x C batches; grey
    images are repeated to RGB, as torch-fidelity's network takes RGB."""
    pool, logits, seconds = [], [], 0.0
    with tqdm(total=total, desc=what, unit="img", file=sys.stderr) as bar:
        for batch in batches:
            t0 = time.time()
            f, l = net(batch.permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous().to(device))
            pool.append(f.cpu())
            logits.append(l.cpu())
            seconds += time.time() - t0
            bar.update(len(batch))
    return torch.cat(pool), torch.cat(logits), seconds


def batched(images, batch_size):
    return (torch.as_tensor(images[i:i + batch_size]) for i in range(0, len(images), batch_size))


def read_images(path, flag, size=None):
    """uint8 N x H x W x C images from an .npz (arr_0) or a folder, all of one size."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if os.path.isdir(path):
        files = image_files(path)
        images = [np.asarray(Image.open(f).convert("RGB")) for f in tqdm(files, desc=path, file=sys.stderr)]
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"{flag} {path}: the images are not all of one size")
        images = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    else:
        try:
            images = np.load(path)["arr_0"]
        except Exception as e:
            raise ValueError(f"{flag} {path}: not an .npz of images under arr_0 ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"{flag} {path}: expected uint8 images N x H x W x C with C 1 or 3, found "
                         f"{images.dtype} {images.shape}")
    if len(images) < 2:
        raise ValueError(f"{flag} {path}: FID needs at least 2 images, found {len(images)}")
    if size is not None and images.shape[1:3] != (size, size):
        raise ValueError(f"{flag} {path} holds {images.shape[2]}x{images.shape[1]} images, the samples are "
                         f"{size}x{size}")
    return images


def dataset_images(name, data_dir, size, batch_size):
    """uint8 batches of a training set as data.py serves it (without the random flips), and its size."""
    dataset = load_dataset(name, data_dir, size)
    if isinstance(dataset, ArrayDataset):  # held in memory as uint8 already
        return batched(dataset.images.permute(0, 2, 3, 1), batch_size), len(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=min(4, os.cpu_count() or 1))
    return (to_uint8(x) for x, _ in loader), len(dataset)


def reference(args, ref, data_dir, size, net, device, tag):
    """(FID statistics, description) of the reference set; a dataset's are cached in --cache-dir."""
    if ref.endswith(".npz") and os.path.isfile(ref) and "mu" in np.load(ref):  # statistics
        stats = dict(np.load(ref))
        if stats.get("image_size", size) != size:
            raise ValueError(f"--ref {ref} is of {stats['image_size']} px images, the samples are {size} px")
        return {"mu": stats["mu"].astype(np.float32), "sigma": stats["sigma"].astype(np.float64)}, ref
    if ref not in DATASETS:  # a folder or an .npz of images
        images = read_images(ref, "--ref", size)
        pool = features(net, batched(images, args.batch_size), len(images), device, "reference")[0]
        return fid_features_to_statistics(pool), f"{ref} ({len(images)} images)"
    where = f"-{hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:8]}" if ref == "folder" else ""
    path = os.path.join(args.cache_dir, f"{ref}{where}-{size}px-{tag}.npz")
    if not os.path.exists(path):
        common.writable(("--cache-dir", path))
        batches, n = dataset_images(ref, data_dir, size, args.batch_size)
        stats = fid_features_to_statistics(features(net, batches, n, device, f"reference: {ref}")[0])
        with common.atomic_write(path) as f:
            np.savez(f, **stats, n=n, image_size=size, dataset=ref, weights=tag)
    stats = dict(np.load(path))
    return stats, f"{ref} training set ({stats['n']} images; statistics in {path})"


def score(args):
    """A row per checkpoint (or one for the export): FID, IS and what they were measured on."""
    _, _, device = common.setup(args.device)
    if args.ckpt is None:  # an export
        source = args.npz or args.png_dir
        images = read_images(source, "--npz" if args.npz else "--png-dir")
        net, tag = extractor(args, device)
        t0 = time.time()
        ref_stats, ref = reference(args, args.ref, args.data_dir, images.shape[1], net, device, tag)
        t1 = time.time()
        pool, logits, _ = features(net, batched(images, args.batch_size), len(images), device, "samples")
        return [row(source, pool, logits, ref_stats, ref, args,
                    f"reference {t1 - t0:.0f} s, features {time.time() - t1:.0f} s")]
    paths = sorted(glob.glob(args.ckpt)) if glob.has_magic(args.ckpt) else [args.ckpt]  # or a hub name
    if not paths:
        raise FileNotFoundError(f"no checkpoint at --ckpt {args.ckpt}")
    rows, refs, net = [], {}, None
    for path in paths:
        model, diffusion, label, ckpt = sample.load(path, args, device)
        key = (args.ref or ckpt["args"]["dataset"], args.data_dir or ckpt["args"]["data_dir"], args.image_size)
        if key[0] is None:  # a published network
            raise ValueError(f"{path} was not trained here: give --ref, the images to score it against")
        if net is None:  # once a checkpoint is read: a refused one does not wait for the digit classifier to train
            net, tag = extractor(args, device)
        t0 = time.time()  # the reference first: a wrong one fails before the sampling
        if key not in refs:
            refs[key] = reference(args, *key, net, device, tag)
        t1 = time.time()
        batches = (sample.images(diffusion, model, args, indices, label)
                   for [indices] in sample.rounds(0, args.num_samples, args.batch_size, 1))
        pool, logits, seconds = features(net, batches, args.num_samples, device, f"samples: {path}")
        steps = args.steps or diffusion.default_steps(args.method)
        rows.append(row(f"{path} (step {ckpt['step']}) | {args.method} {steps} steps, "
                        f"{'EMA' if args.ema else 'raw'} weights", pool, logits, *refs[key], args,
                        f"reference {t1 - t0:.0f} s, sampling {time.time() - t1 - seconds:.0f} s, "
                        f"features {seconds:.0f} s"))
    return rows


def row(source, pool, logits, ref_stats, ref, args, timing):
    """Print and return the scores of one set of samples."""
    fid = fid_statistics_to_metric(fid_features_to_statistics(pool), ref_stats, verbose=False)
    isc = isc_features_to_metric(logits, splits=min(args.isc_splits, len(logits)))
    scores = dict(fid=fid["frechet_inception_distance"], is_mean=isc["inception_score_mean"],
                  is_std=isc["inception_score_std"], n=len(pool))
    note = " (digit features)" if args.features == "digits" else ""
    print(f"{source} | FID{note} {scores['fid']:.2f} | IS {scores['is_mean']:.2f} ± {scores['is_std']:.2f} | "
          f"n {len(pool)} | reference {ref}", flush=True)
    print(f"  ({timing})", file=sys.stderr)
    return scores


def main(argv=None):
    return common.run(score, parse_args(argv))


if __name__ == "__main__":
    main()
