"""
Datasets by name. Every dataset yields (image, label): image a float tensor (C, H, W) with
pixels in [-1, 1], label an int (0 where the dataset has none). `num_classes` is 0 for a
dataset without labels; `hflip` says whether training should flip images at random
(done on the batch, in train.py, by `random_hflip`). `batches` serves a training set in
the seeded order that a resumed run takes up again.
"""
import os
import pickle
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets as tv
from torchvision import transforms as T

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# name: (channels, default image size, random horizontal flips when training)
DATASETS = {"mnist5k": (1, 28, False), "mnist": (1, 28, False), "cifar10": (3, 32, True),
            "celeba": (3, 64, True), "folder": (3, 64, True)}
DIGITS = [str(d) for d in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def from_uint8(x):
    """uint8 pixels -> floats in [-1, 1], the layout kept."""
    return x.float().div(127.5).sub(1)


def to_uint8(x):
    """[-1, 1] NCHW floats -> uint8 NHWC on the CPU, rounded and clipped."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


class ArrayDataset(Dataset):
    """uint8 images (N, C, H, W), their labels and the class names, held in memory; no workers needed."""

    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return from_uint8(self.images[i]), self.labels[i]


def mnist(root, image_size, embedded=False):
    """MNIST digits: the 60000 training digits, downloaded by torchvision into root when missing,
    or (embedded) the 5000 shipped in assets/ (500 per class), which train with no download.
    They are 28 px; a larger size pads the black border (32 for a 4-level UNet)."""
    if embedded:
        data = np.load(os.path.join(ASSETS, "mnist5k.npz"))
        images, labels = torch.from_numpy(data["images"]), torch.from_numpy(data["labels"])
    else:
        try:
            data = tv.MNIST(root, train=True, download=True)
        except Exception as e:  # no network, a half-downloaded file...
            raise FileNotFoundError(f"could not load or download MNIST into {root!r}: {e}") from None
        images, labels = data.data, data.targets
    if image_size < 28 or image_size % 2:
        raise ValueError(f"MNIST images are 28 px: --image-size must be 28, 30, 32, ... not {image_size}")
    pad = (image_size - 28) // 2
    return ArrayDataset(torch.nn.functional.pad(images.unsqueeze(1), (pad,) * 4), labels, DIGITS)


def cifar10(root, image_size):
    """The 50000 CIFAR-10 training images from the python pickles in
    root/cifar-10-batches-py/, downloaded by torchvision when missing."""
    if image_size != 32:
        raise ValueError(f"CIFAR-10 images are 32 px, not {image_size}: drop --image-size")
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        try:
            tv.CIFAR10(root, train=True, download=True)
        except Exception as e:
            raise FileNotFoundError(f"no {folder}/ and could not download CIFAR-10 into {root!r}: {e}") from None
    images, labels = [], []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise FileNotFoundError(f"cannot read CIFAR-10 batch {path}: {e}") from None
        images.append(torch.as_tensor(np.asarray(batch["data"], dtype=np.uint8)).view(-1, 3, 32, 32))
        labels.append(torch.as_tensor(batch["labels"]))
    return ArrayDataset(torch.cat(images), torch.cat(labels), CIFAR10_CLASSES)


def image_files(root):
    """Every image file under root, at any depth, sorted."""
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS))


class ImageFolder(Dataset):
    """Every image file under `root` (recursively), or those named in `split`, its short side
    resized to image_size and its centre cropped. With `labels`, the first-level sub-folder names
    are the classes. A file that cannot be read is skipped with a warning naming it."""

    def __init__(self, root, image_size, labels=False, split=None):
        self.root, self.files = root, [f for f in image_files(root) if split is None or os.path.basename(f) in split]
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}"
                                    + ("" if split is None else " in the training split"))
        self.classes, self.labels = [], [0] * len(self.files)
        if labels:
            parts = [os.path.relpath(f, root).split(os.sep) for f in self.files]
            if any(len(p) == 1 for p in parts):
                raise ValueError(f"class labels need every image in a sub-folder (one per class) of {root!r}")
            self.classes = sorted({p[0] for p in parts})
            self.labels = [self.classes.index(p[0]) for p in parts]
        self.transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor(), from_uint8])
        # files found unreadable, in memory shared with the DataLoader's workers: each is warned of once
        self.unreadable = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        self[0]  # a folder of unreadable files fails here, in one line, not in a worker

    def __len__(self):
        return len(self.files)

    def load(self, path):
        with Image.open(path) as img:
            return self.transform(img.convert("RGB"))

    def __getitem__(self, i):
        # a corrupt file is replaced by the next readable one, so one bad image never stops a run
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            if self.unreadable[k]:
                continue
            try:
                return self.load(self.files[k]), self.labels[k]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what PIL raises
                self.unreadable[k] = True
                warnings.warn(f"skipping unreadable image {self.files[k]}: {e}")
        raise ValueError(f"no readable images under {self.root!r}")


def find_celeba(root):
    """(img_align_celeba folder, partition file or None) under root, as torchvision unpacks it
    (root/celeba/), as the official zip does (root/) or as Kaggle's copy does (nested twice)."""
    for base in (root, os.path.join(root, "celeba")):
        images = os.path.join(base, "img_align_celeba")
        if os.path.isdir(os.path.join(images, "img_align_celeba")):  # Kaggle
            images = os.path.join(images, "img_align_celeba")
        if os.path.isdir(images):
            partitions = [os.path.join(base, f"list_eval_partition.{ext}") for ext in ("txt", "csv")]
            return images, next((p for p in partitions if os.path.exists(p)), None)
    return None, None


def celeba(root, image_size):
    """CelebA aligned faces: img_align_celeba/*.jpg in root or in its celeba/ folder, downloaded
    there by torchvision when missing; the official train split when list_eval_partition.txt (or
    .csv) is beside it. Each 178x218 photo becomes its centre 178x178 square, resized."""
    images, partition = find_celeba(root)
    if images is None:  # torchvision's download, into root/celeba/ (Google Drive often refuses it)
        try:
            tv.CelebA(root, split="train", download=True)
        except Exception as e:
            raise FileNotFoundError(
                f"no img_align_celeba/ in {root!r} or {os.path.join(root, 'celeba')!r}, and torchvision could not "
                f"download CelebA ({e}): get img_align_celeba.zip and list_eval_partition.txt from "
                "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (or Kaggle's celeba-dataset), unpack them into "
                "data/celeba/ (img_align_celeba/*.jpg beside list_eval_partition.txt), or give --data-dir, the "
                "folder that holds img_align_celeba/") from None
        images, partition = find_celeba(root)
    split = None
    if partition:
        with open(partition) as f:
            rows = [line.replace(",", " ").split() for line in f]
        split = {row[0] for row in rows if len(row) == 2 and row[1] == "0"}
    return ImageFolder(images, image_size, split=split)


def load_dataset(name, data_dir=None, image_size=None, class_labels=False):
    """The training set `name` (a key of DATASETS: callers check it), with attributes channels,
    image_size, classes (names, [] for none), num_classes and hflip. mnist, cifar10 and celeba
    are downloaded into data_dir (default ./data) when missing."""
    channels, size, hflip = DATASETS[name]
    size = image_size or size
    root = data_dir or "data"
    if name in ("mnist5k", "mnist"):
        dataset = mnist(root, size, embedded=name == "mnist5k")
    elif name == "cifar10":
        dataset = cifar10(root, size)
    elif name == "celeba":
        dataset = celeba(root, size)
    else:  # a folder of images, which --data-dir must name
        if not data_dir or not os.path.isdir(data_dir):
            raise FileNotFoundError((f"image folder not found at {data_dir!r}" if data_dir else "no --data-dir given")
                                    + ": give --data-dir, a folder of images (any depth)")
        dataset = ImageFolder(data_dir, size, labels=class_labels)
    dataset.channels, dataset.image_size, dataset.hflip = channels, size, hflip
    dataset.num_classes = len(dataset.classes)
    return dataset


def random_hflip(x):
    """Flip each image of a batch left-right with probability 1/2 (uses the global RNG)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def batches(dataset, batch_size, seed, rank, world, step, device, workers=None):
    """Endless batches for this DDP rank, on `device`, in an order fixed by (seed, epoch):
    resuming at `step` goes on with the same images in the same order as a run that never
    stopped. workers=None: 0 for in-memory datasets, else min(4, CPU cores)."""
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} images are too few for --batch-size {batch_size} "
                         f"on {world} process(es)")
    if workers is None:
        workers = 0 if isinstance(dataset, ArrayDataset) else min(4, os.cpu_count() or 1)

    def indices():  # every epoch's order, from `step` on, through one loader whose workers never stop
        epoch, skip = divmod(step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            yield from list(sampler)[skip * batch_size:per_epoch * batch_size]
            epoch, skip = epoch + 1, 0
    loader = DataLoader(dataset, batch_size, sampler=indices(), num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # not the global RNG
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
