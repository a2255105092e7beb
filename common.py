"""
What every script shares: flags made from its config constants, the one-line `error:` exit,
device and torchrun setup, and output files that appear whole or not at all.
"""
import argparse
import contextlib
import csv
import ctypes
import errno
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image


# ---------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(doc, epilog=None):
    """A parser whose --help starts with the script's docstring, its commands as written."""
    return Parser(description=doc, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def ints(text):
    return tuple(int(v) for v in text.split(","))


def bools(text):
    values = ints(text)
    if not set(values) <= {0, 1}:
        raise argparse.ArgumentTypeError(f"use 0 or 1 per level, e.g. 0,0,1, not {text}")
    return tuple(bool(v) for v in values)


def as_typed(value):
    """A value as it is typed on the command line: (False, False, True) is 0,0,1."""
    return ",".join(str(int(v)) for v in value) if isinstance(value, tuple) else value


def add_flags(p, constants, defaults=None, only=None, **special):
    """A flag per `NAME = value  # comment` line of the script that holds `constants` (its
    globals()), or per name in `only`: --name for NAME, the comment as help, the default from
    `defaults` (the constants themselves if None) and the type from the constant's value.
    `special` adds argparse keywords for a name, e.g. DATASET=dict(choices=...), or type=int
    where the constant is None."""
    with open(constants["__file__"]) as f:
        source = f.read()
    for name, comment in re.findall(r"^([A-Z_]+) = .*?  # (.*)$", source, re.M):
        if only is not None and name not in only:
            continue
        value = constants[name]
        kwargs = dict(type=type(value)) if value is not None else {}
        if isinstance(value, bool):
            kwargs = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(value, tuple):
            kwargs = dict(type=bools if isinstance(value[0], bool) else ints)
        default = value if defaults is None else defaults[name]
        help = f"{comment} (default: {as_typed(default)})" if default is not argparse.SUPPRESS else comment
        p.add_argument("--" + name.lower().replace("_", "-"), default=default, help=help.replace("%", "%%"),
                       **{**kwargs, **special.get(name, {})})
    return p


def check(p, args, test, rule, *names):
    """Refuse a flag whose value fails `test` (as NaN fails any), naming it: --name must be `rule`."""
    for name in names:
        value = getattr(args, name, None)  # a script without that flag, or None: nothing to check
        if value is not None and not test(value):
            p.error(f"--{name.replace('_', '-')} must be {rule}")


def at_least(p, args, minimum, *names):
    check(p, args, lambda v: v >= minimum, "0 or more" if minimum == 0 else f"at least {minimum}", *names)


def run(main, args, errors=(ValueError, OSError)):
    """main(args), with each warning on one line, bad input or a full disk as one `error:` line,
    Ctrl-C as exit 130 and SIGTERM (kill) as exit 143, both after the `finally` blocks ran."""
    warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        return main(args)
    except errors as e:
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupt:
    """SIGINT / SIGTERM set `signum`, so that a loop can finish its step, save and exit;
    a second Ctrl-C exits at once. restore() puts the previous handlers back."""

    def __init__(self):
        self.signum, self.pid = None, os.getpid()
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a DataLoader worker, forked with this handler: the main process acts
            return
        self.signum = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to quit now)",
              file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLog:
    """Rank 0's record of a training run: a line per log interval on the terminal, the same values
    appended to OUT_DIR/log.csv and, with --wandb, logged to Weights & Biases with each grid."""
    FIELDS = ("step", "loss", "q0", "q1", "q2", "q3", "lr", "img_per_s", "grad_norm", "skipped", "minutes")

    def __init__(self, args, step, world):
        self.args, self.world, self.path, self.wandb = args, world, os.path.join(args.out_dir, "log.csv"), None
        if step and os.path.exists(self.path):  # resumed: the rows after the checkpoint's step are trained again
            with open(self.path) as f:
                rows = f.readlines()
            with atomic_write(self.path) as f:
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

    def line(self, step, read, lr):
        """The means over the updates since the last line (`read`: train.py's totals), and the speed
        over its steps."""
        now, steps = time.time(), step - self.step
        rate, updates, (sums, counts) = steps / (now - self.t_line), max(1, steps - read["skipped"]), read["quarters"]
        row = dict(step=step, loss=read["loss"] / updates, **{f"q{i}": s / n if n else math.nan for i, (s, n) in
                                                              enumerate(zip(sums, counts))},
                   lr=lr, img_per_s=rate * self.args.batch_size * self.world,
                   grad_norm=read["grad_norm"] / updates, skipped=int(read["skipped"]), minutes=(now - self.t0) / 60)
        if row["skipped"]:
            print(f"steps {self.step + 1}-{step}: {row['skipped']} update(s) skipped for a non-finite loss or "
                  "gradient", file=sys.stderr, flush=True)
        print(f"step {step}/{self.args.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
              f"{row['img_per_s']:.1f} img/s | {row['minutes']:.1f} min | "
              f"ETA {(self.args.max_steps - step) / rate / 60:.1f} min", flush=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            if f.tell() == 0:  # a new file
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


def zero_totals(device, run=None):
    """train.py's device-side totals, which RunLog's lines read (see `tally`), at 0; `run`, the
    bad steps in a row so far, goes on across log lines."""
    totals = {k: torch.zeros((), device=device) for k in ("loss", "grad_norm", "skipped", "run", "longest", "began")}
    return {**totals, "quarters": torch.zeros(2, 4, device=device), **({} if run is None else {"run": run})}


def tally(totals, losses, t, grad_norm, skip, bad, step, T):
    """Add a step to the device-side totals that a log line reads: loss and gradient norm summed
    over the updates made, loss and count per quarter of the timestep range (q0 is t < T/4, fine
    detail; q3 t >= 3T/4, global structure), updates skipped, and the bad steps in a row: the
    current run, the longest and the step it began at."""
    keep = 1 - skip
    losses = torch.where(skip > 0, 0.0, losses)  # a NaN times 0 is still NaN
    quarter = t * 4 // T
    quarters = torch.zeros(2, 4, device=t.device).index_add_(1, quarter, torch.stack([losses, keep.expand_as(losses)]))
    run = (totals["run"] + 1) * bad
    return {"loss": totals["loss"] + losses.mean(), "quarters": totals["quarters"] + quarters,
            "grad_norm": totals["grad_norm"] + torch.where(skip > 0, 0.0, grad_norm),
            "skipped": totals["skipped"] + skip, "run": run,
            "began": torch.where(run > totals["longest"], step - run + 1, totals["began"]),
            "longest": torch.maximum(totals["longest"], run)}


# ---------------------------------------------------------------- devices and torchrun

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


def amp_dtype(name, device):
    """The autocast dtype of --dtype `name`, or None for plain fp32."""
    if name == "auto":  # bf16 on CUDA, or fp16 on GPUs without it
        return None if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def setup(name):
    """(rank, world size, device) for --device `name`; starts the process group under torchrun."""
    keep_freed_memory()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if name == "auto":
        name = "cuda" if gpus() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda:") and world > 1:
        raise ValueError(f"--device {name} would put every torchrun process on one GPU: give "
                         "--device cuda (or auto), and each process takes the GPU of its LOCAL_RANK")
    if name == "cuda":  # a GPU by index, as set_device needs: under torchrun, the LOCAL_RANK-th
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and device.index >= gpus()
            or device.type == "mps" and not torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: this machine has no such device (--device auto picks one)")
    if device.type == "cuda":
        use_gpu(device)
    if world > 1:  # NCCL takes CUDA tensors only: CPU flags and barriers go through gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def gather(batch, counts, batch_size):
    """On rank 0, every process's batch (counts[k] images from rank k) in rank order; None on
    the others. Through gloo, as the tensors are on the CPU."""
    padded = batch.new_zeros(batch_size, *batch.shape[1:])  # gather takes tensors of one shape
    padded[:len(batch)] = batch
    parts = [torch.empty_like(padded) for _ in counts] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    return None if parts is None else torch.cat([part[:n] for part, n in zip(parts, counts)])


def wait_for_all(world):
    """Every process gets here before any goes on (a CPU all-reduce: gloo, also beside NCCL)."""
    if world > 1:
        dist.all_reduce(torch.zeros(1))


# ---------------------------------------------------------------- files

def safe_load(file, path, what="checkpoint"):
    """torch.load of tensors and plain Python values only: a file that holds code is refused,
    in one line, and its code is not run."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {what} at {path}") from None
    except Exception as e:  # pickled code, a truncated file, not a torch file at all, or no file to open
        if isinstance(e, OSError) and e.filename is not None:  # a symlink loop, no permission
            raise OSError(f"cannot read the {what} {path}: {e.strerror}") from None
        found = re.search(r"GLOBAL (\S+)", str(e))  # weights_only's unpickler names what it refused
        reason = f"it holds pickled code ({found.group(1)}), which was not run" if found else "truncated, or not a torch file"
        raise ValueError(f"{path} is not a safe, readable {what}: {reason}") from None


def writable(*flagged):
    """For each (flag, path), path None or not: make the file's folder and try the file, before
    the work that will write it."""
    for flag, path in filter(lambda pair: pair[1], flagged):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path + ".tmp", "wb").close()
        except OSError as e:
            raise OSError(f"cannot write to {flag} {path}: {e.strerror}") from None
        finally:  # also when a signal ends the process here
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")


@contextlib.contextmanager
def atomic_write(path, sync=False):
    """A binary file for `path` that appears there whole or not at all: it is written to
    path.tmp and renamed over `path` when the block ends (after an fsync with `sync`, for
    files that must survive a power cut). On any error the temp file is removed, and an
    OSError (a full disk...) names `path`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"could not write {path} ({e.strerror or e})") from None
    finally:  # after an error (after the rename, there is no temp file left)
        with contextlib.suppress(OSError):  # never made, or its folder is not there
            os.remove(tmp)


def save_image(image, path, frames=(), durations=None):
    """A PIL image to `path`, whole or not at all, in the format its extension names; with
    `frames` after it, an animated GIF that loops, each image shown for its duration (ms)."""
    with atomic_write(path) as f:
        image.save(f, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()],
                   **dict(save_all=True, append_images=frames, duration=durations, loop=0) if frames else {})


@contextlib.contextmanager
def npz_writer(path, shape):
    """A stream for uint8 arrays of `shape` (N, ...) in total, into path's arr_0 (the ADM
    evaluation suite's format) as they come: memory stays flat, and `path` appears only once all
    of it is in. The disk space is reserved at the start, so that a full disk fails then, in one
    line, not hours into the work (Linux; elsewhere it fails at the write)."""
    size = math.prod(shape) + 4096  # + the .npy and zip headers
    with atomic_write(path) as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except AttributeError:  # macOS, Windows
            pass
        except OSError as e:  # a filesystem that cannot reserve goes on: a full disk fails at the write
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
                raise OSError(e.errno, f"it needs {size / 1e6:.1f} MB, and {free / 1e6:.1f} MB are free") from None
        with zipfile.ZipFile(f, "w") as zf, zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            yield member
        f.truncate()  # to what was written, less than what was reserved
