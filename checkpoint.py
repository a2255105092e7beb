"""
The checkpoint format, in one place: what train.py writes, and how sample.py, edit.py, fid.py
and train.py (--resume, --init-from) read it back.

ckpt.pt, written every --save-every steps (the one before it kept as ckpt.prev.pt), is a dict of
plain tensors, numbers, strings, lists and dicts, so that torch.load(weights_only=True) reads it:
    model         the raw weights (a state_dict; taken before compile and DDP: no key prefixes)
    ema           the EMA weights (a state_dict)
    optimizer     AdamW's state_dict
    scaler        the fp16 GradScaler's state_dict ({} unless the run used fp16)
    step          the steps trained (int)
    model_config  model.UNetConfig's fields (tuples as lists)
    diffusion     diffusion.Diffusion's T, schedule, objective, variance, and clip (optional, absent = True)
    args          train.py's flags (a dict), image_size among them
    classes       the class names ([] for an unconditional model)
    rng           {"torch": the CPU RNG state, "cuda": [the GPU's RNG state] or []}
An EMA export (ema_fp16.pt, snapshots/ema_<step>.pt) holds ema (fp16), model_config, diffusion,
args, step and classes. A published network (pretrained.py) reads as an export at step 0.
"""
import os
import re
import shutil
from dataclasses import asdict

import torch

import common
import pretrained
from model import UNetConfig, build_unet

EXPORT = ("ema", "model_config", "diffusion", "args", "step", "classes")
# train.py's flags that make the network and the diffusion: --init-from takes the network's own
NETWORK_ARGS = ("layout", "channels", "attention", "num_res", "neck_length", "time_emb_dim", "timesteps",
                "schedule", "objective", "variance")


def config_dict(config):
    """A UNetConfig as plain values (lists, not tuples), as checkpoints store it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def state(run, step):
    """Everything a resume needs, from a training run (train.setup's: its model, ema, optimizer, scaler,
    args, classes and device), refused if the weights are not finite (a resume would go on from NaN)."""
    args, device = run.args, run.device
    for name, net in (("weights", run.model), ("EMA weights", run.ema)):
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise FloatingPointError(f"the {name} are not finite at step {step}: checkpoint not written")
    return {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "step": step, "model_config": config_dict(run.model.config),
            "diffusion": {"T": args.timesteps, "schedule": args.schedule, "objective": args.objective,
                          "variance": args.variance, "clip": getattr(args, "clip", True)},
            "args": vars(args), "classes": list(run.classes),
            "rng": {"torch": torch.get_rng_state(),  # and the training GPU's alone: a resume may see fewer
                    "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}}


def save(ckpt, path, keep_previous=True):
    """Write atomically, keeping the last one as *.prev.pt: a crash at any moment of a save
    leaves a complete ckpt.pt, and a bad checkpoint still has a predecessor."""
    prev = path[:-3] + ".prev.pt"
    try:
        with common.atomic_write(path, sync=True) as f:
            torch.save(ckpt, f)
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


def save_export(ckpt, path):
    """Write the EMA weights alone, in fp16, with what sample.py needs: a small file to sample from or share."""
    export = {**{k: ckpt[k] for k in EXPORT}, "ema": {k: v.half() for k, v in ckpt["ema"].items()}}
    save(export, path, keep_previous=False)


def load(path, full=None):
    """A checkpoint of train.py's, read safely, or a published network in diffusers' format (a
    hub name or a folder, see pretrained.py) as an export. With `full` (what to do instead), an
    export is refused: only a whole checkpoint has the raw weights and the optimizer."""
    path = os.fspath(path)
    if os.path.isdir(path) or re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path) \
            and not path.endswith((".pt", ".pth")):
        ckpt = pretrained.checkpoint(path)
    else:
        try:
            ckpt = common.safe_load(path, path)
        except ValueError as e:  # a corrupt ckpt.pt: say whether the one before it can take over
            prev = path[:-3] + ".prev.pt"
            try:
                step = common.safe_load(prev, prev)["step"]
            except (ValueError, OSError, KeyError, TypeError):
                raise e from None
            raise ValueError(f"{e}; {prev} (step {step}) is readable: resume from it with cp {prev} {path} && "
                             f"python train.py --resume --out-dir {os.path.dirname(path) or '.'}") from None
        if not isinstance(ckpt, dict) or not set(EXPORT) - {"step", "classes"} <= ckpt.keys():
            raise ValueError(f"{path} is a torch file but not a checkpoint written by train.py")
    if full and "model" not in ckpt:
        raise ValueError(f"{path} holds only EMA weights (an ema_fp16.pt export?): {full}")
    return ckpt


def network(ckpt, ema=True):
    """The UNet of a checkpoint's config, with its EMA (or raw) weights."""
    try:
        model = build_unet(UNetConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except (TypeError, RuntimeError) as e:  # another version's config, or weights of another model
        raise ValueError(f"the checkpoint's weights do not fit its model config ({str(e).splitlines()[0]})") from None
    return model


def from_pretrained(name_or_folder):
    """Ho et al.'s network with its published weights (nanoGPT's GPT.from_pretrained), in eval
    mode: a hub name (google/ddpm-cifar10-32, google/ddpm-ema-church-256, ...), downloaded once
    into the hub's cache, or a folder in diffusers' format. pretrained.py reads them."""
    return network(load(name_or_folder)).eval()


def settings(ckpt):
    """train.py's flags that a checkpoint's network and diffusion fix, and its image size."""
    d = ckpt["diffusion"]
    own = {"layout": "ours", **ckpt["model_config"], "timesteps": d["T"], "schedule": d["schedule"],
           "objective": d["objective"], "variance": d.get("variance", "small"), "clip": d.get("clip", True),
           "image_size": ckpt["args"]["image_size"], "class_cond": ckpt["model_config"].get("num_classes", 0) > 0}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}


def resume(args, path):
    """(args, checkpoint) for --resume: the checkpoint's flags, but for those given now and the
    --out-dir it was found in. Without --resume, (args, None), and an existing ckpt.pt is refused."""
    if not args.resume:
        if os.path.exists(path):  # a forgotten --resume would overwrite it
            raise ValueError(f"{path} exists: add --resume to continue that run, or give another "
                             "--out-dir (or delete that one) to start over")
        return args, None
    ckpt = load(path, full="it cannot resume training")
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["args"].items()}  # older ones hold lists
    # a moved run folder keeps its outputs together; flags the checkpoint does not know take their defaults
    args = type(args)(**{**vars(args), **saved, **{n: getattr(args, n) for n in args.explicit},
                         "explicit": args.explicit, "out_dir": args.out_dir})
    if ckpt.get("step", 0) >= args.max_steps:
        raise ValueError(f"{path} is at step {ckpt.get('step', 0)}, and --max-steps is {args.max_steps}: "
                         "nothing to train; give a larger --max-steps")
    return args, ckpt


def init_from(args):
    """--init-from's checkpoint, with its network's settings (and its image size, unless
    --image-size is given) put into args; None without the flag."""
    if not args.init_from:
        return None
    given = [n for n in NETWORK_ARGS if n in args.explicit]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is the network's own with --init-from: drop it")
    init = load(args.init_from)
    taken = NETWORK_ARGS + ("clip",) + ("image_size",) * ("image_size" not in args.explicit)
    vars(args).update({k: v for k, v in settings(init).items() if k in taken})
    return init


def check_fits(ckpt, config, args, resumed_from=None):
    """Refuse a checkpoint whose network is not the one `config` and `args` describe: a run resumed
    from it keeps all of it (dropout, diffusion and image size too), one fine-tuned (--init-from) its shape."""
    now = {**config_dict(config), **vars(args)}
    saved = {**ckpt["model_config"], **(settings(ckpt) if resumed_from else {})}
    typed = lambda v: common.as_typed(tuple(v) if isinstance(v, list) else v)
    changed = ", ".join(f"{k} {typed(v)} there, {typed(now[k])} here" for k, v in saved.items()
                        if (resumed_from or k != "dropout") and k in now and typed(now[k]) != typed(v))
    if changed and resumed_from:
        raise ValueError(f"{resumed_from} was trained otherwise ({changed}): resume with the flags and data it "
                         "was trained with, or start anew in another --out-dir")
    if changed:
        raise ValueError(f"--init-from {args.init_from} is a network for other images ({changed}): fine-tune it "
                         f"on images like its own (--dataset {args.dataset} differs)")


def restore(ckpt, path, model, ema, optimizer, scaler, device):
    """Put a checkpoint's weights, optimizer, scaler and RNG states back; returns its step."""
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty unless the run that saved it used fp16
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][0], device)
        return ckpt["step"]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # e.g. another version's checkpoint
        raise ValueError(f"{path} does not fit this train.py ({str(e).splitlines()[0]})") from None
