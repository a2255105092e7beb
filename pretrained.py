"""
Ho et al. 2020's published networks (google/ddpm-cifar10-32, google/ddpm-ema-church-256, ...),
from the Hugging Face hub or a folder in diffusers' format, read as diffusers reads them, as
checkpoints of this code: the network in model.HoUNet, its weights renamed, its DDPM scheduler's
settings as the diffusion's. checkpoint.load (so sample.py, fid.py, edit.py and train.py
--init-from) reads them through `checkpoint`. The hub's library is imported only for a hub name.
"""
import json
import math
import os
import re
import reprlib
import warnings

import torch

import common
from model import UNetConfig, build_unet, check_image_size

# diffusers' UNet2DModel settings that change the network, at diffusers' defaults (what a
# config.json that leaves one out means), and as Ho et al.'s network has them (google/ddpm-*)
DIFFUSERS = {"act_fn": "silu", "attention_head_dim": 8, "center_input_sample": False, "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
             "attn_norm_num_groups": None, "time_embedding_type": "positional", "time_embedding_dim": None,
             "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
             "add_attention": True, "downsample_type": "conv", "upsample_type": "conv", "mid_block_type": "UNetMidBlock2D"}
HO_LAYOUT = {**DIFFUSERS, "attention_head_dim": None, "downsample_padding": 0, "flip_sin_to_cos": False,
             "freq_shift": 1, "norm_eps": 1e-6}
# the settings the network needs that UNet2DModel has no usable default for
REQUIRED = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
            "layers_per_block", "sample_size")
SUPPORTED = "only pixel-space UNet2DModel networks in Ho et al.'s layout (google/ddpm-*) can be loaded"
# diffusers' DDPMScheduler defaults, for the settings a scheduler config leaves out
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
             "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
             "thresholding": False, "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}
# their weights' names -> HoUNet's, in turn (query/key/value/proj_attn: files before diffusers 0.14)
RENAMES = [(r"^time_embedding\.linear_1", "time_mlp.0"), (r"^time_embedding\.linear_2", "time_mlp.2"),
           (r"^conv_norm_out", "norm_out"), (r"^mid_block\.resnets\.0", "mid.0"), (r"^mid_block\.attentions\.0", "mid.1"),
           (r"^mid_block\.resnets\.1", "mid.2"), (r"^down_blocks", "downs"), (r"^up_blocks", "ups"),
           (r"\.resnets\.", ".res."), (r"\.attentions\.", ".attn."), (r"\.(down|up)samplers\.0\.conv\.", ".resample."),
           (r"\.time_emb_proj\.", ".emb."), (r"\.conv_shortcut\.", ".skip."), (r"\.group_norm\.", ".norm."),
           (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."), (r"\.(to_v|value)\.", ".v."),
           (r"\.(to_out\.0|proj_attn)\.", ".out.")]


def checkpoint(name):
    """A published network as a checkpoint of train.py's, EMA weights and all (the hub's raw
    weights where it has no EMA ones). Safetensors where there are both; a .bin is read with
    torch.load(weights_only=True), and a .bin that holds pickled code is refused."""
    get, need, unet = files(name)
    model_config, size = ho_config(read_json(get(unet + "config.json")), os.path.join(name, unet + "config.json"))
    scheduler = "scheduler/scheduler_config.json" if unet else "scheduler_config.json"
    settings = get(scheduler, "DDPMScheduler's defaults are used (variance fixed_small, x0 clipped)")
    weights = need(unet + "diffusion_pytorch_model.safetensors", unet + "diffusion_pytorch_model.bin")
    state = state_dict(read_weights(weights))
    with torch.device("meta"):  # the shapes of the network config.json describes, without making its weights
        shapes = {k: tuple(v.shape) for k, v in build_unet(UNetConfig(**model_config)).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    wrong = next((k for k in [*shapes, *found] if found.get(k) != shapes.get(k)), None)
    if wrong:
        raise ValueError(f"{weights} does not fit its config.json: its {wrong} (HoUNet's name) is "
                         f"{found.get(wrong, 'missing')}, the config's {shapes.get(wrong, 'absent')}")
    return {"ema": state, "model_config": model_config, "step": 0, "classes": [],
            "diffusion": diffusion(read_json(settings) if settings else {}, os.path.join(name, scheduler)),
            "args": {"image_size": size, "dataset": None, "data_dir": None}}


def files(name):
    """(get, need, subfolder) for a hub name or a folder: get(file) is a local path to the model's
    `file`, or None where it has none; need(*files) the first of them it has, or one line on why
    there is none. Its network's files are in `subfolder` ("", or "unet/" in a pipeline's layout)."""
    unknown = {}  # a hub name's files that neither its cache nor the hub could tell of: why not
    if os.path.isdir(name):
        get = lambda file, instead=None: os.path.join(name, file) if os.path.lexists(os.path.join(name, file)) else None
    else:
        get = hub_files(name, unknown)

    def need(*needed):
        path = next(filter(None, map(get, needed)), None)
        asked = [file for file in needed if file in unknown]
        if path is None and asked:
            raise OSError(f"could not download {name}'s {asked[0]} from the Hugging Face hub ({unknown[asked[0]]}), "
                          f"and it is not in the hub's cache; nor is there a file or folder {name} here")
        if path is None:
            raise FileNotFoundError(f"{name} has no {' or '.join(needed)}" + (
                "" if os.path.isdir(name) else f" on the Hugging Face hub, nor is there a file or folder {name} here"))
        return path
    if os.path.isdir(name) and not (get("config.json") or get("unet/config.json")):
        raise FileNotFoundError(f"{name} is a folder without a config.json (nor unet/config.json): give a checkpoint "
                                f"file, e.g. {os.path.join(name, 'ckpt.pt')}, or a model folder in diffusers' format")
    unet = "unet/" if need("config.json", "unet/config.json").endswith("unet/config.json") else ""
    pipeline = unet and get("model_index.json", "read as a pipeline without an autoencoder")
    latent = [k for k in ("vae", "vqvae") if pipeline and k in read_json(pipeline)]
    if latent:
        raise ValueError(f"{name} is a latent diffusion pipeline (it has a {latent[0]}): {SUPPORTED}")
    return get, need, unet


def hub_files(name, unknown):
    """files()'s get(file, instead=None) for a hub name: huggingface_hub's cache first (it also
    knows the files a model lacks), then the hub, while it can be reached. A file neither can
    tell of goes into `unknown`; with `instead`, a warning says that is what is done without it."""
    from huggingface_hub import constants, errors, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import logging
    logging.set_verbosity_error()  # no retry messages: one line if it fails
    unreachable = ["HF_HUB_OFFLINE is set"] if constants.HF_HUB_OFFLINE else []

    def get(file, instead=None):
        try:
            path = try_to_load_from_cache(name, file)
            if path is None and not unreachable:
                path = hf_hub_download(name, file)
        except errors.HFValidationError as e:
            raise ValueError(f"there is no file or folder {name} here, nor is it a Hugging Face hub name ({e})") from None
        except errors.RemoteEntryNotFoundError:  # the hub's answer: it has no such file
            return None
        except errors.RepositoryNotFoundError:
            raise FileNotFoundError(f"no model {name} on the Hugging Face hub, nor a file or folder {name} here") from None
        except OSError as e:  # no network, or no hub: it is not asked again (each try is ~25 s of retries)
            unreachable.append(f"{type(e).__name__}: no network?")
        if path is None:
            unknown[file] = unreachable[0]
            if instead:
                warnings.warn(f"{name}'s {file} is not in the Hugging Face hub's cache, and the hub could not be asked "
                              f"({unreachable[0]}): {instead}")
        return path if isinstance(path, str) else None  # not _CACHED_NO_EXIST, the cache's "it has no such file"
    return get


def read_json(path):
    """A JSON file's object (a dict), or one line naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not valid JSON ({e}): download it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object of settings")
    return value


def read_weights(path):
    """The tensors of a .safetensors or .bin, or one line saying that the file is incomplete."""
    with open(path, "rb") as f:  # what a `git clone` without Git LFS leaves
        if f.read(40) == b"version https://git-lfs.github.com/spec/":
            raise ValueError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in its clone")
    if path.endswith(".bin"):
        state = common.safe_load(path, path, "weights file")
    else:
        import safetensors.torch
        try:
            state = safetensors.torch.load_file(path)
        except safetensors.SafetensorError as e:  # a download or a copy cut short
            raise ValueError(f"{path} is incomplete or not a safetensors file ({e}): download it again") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no network weights (a dict of tensors)")
    return state


def ho_config(config, path):
    """(model.UNetConfig's fields, image size) for a UNet2DModel config in Ho et al.'s layout. It is
    read as diffusers reads it: a setting it leaves out takes UNet2DModel's default."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{path} is a {config['_class_name']}: {SUPPORTED}")
    absent = [k for k in REQUIRED if k not in config]
    if absent:
        raise ValueError(f"{path} lacks {', '.join(absent)}: a UNet2DModel config gives {', '.join(REQUIRED)}")
    down, up, channels, size = (config[k] for k in ("down_block_types", "up_block_types", "block_out_channels", "sample_size"))
    if not (all(type(v) is list and v for v in (down, up, channels)) and len(down) == len(up) == len(channels)
            and all(type(c) is int for c in channels) and all(type(t) is str for t in down + up)):
        raise ValueError(f"{path}: block_out_channels, down_block_types and up_block_types are not lists of one "
                         "width or block name per level")
    size = size[0] if type(size) is list and len(size) == 2 and size[0] == size[1] else size  # diffusers takes [h, w]
    bad = [k for k, v in (("sample_size", size), ("layers_per_block", config["layers_per_block"])) if type(v) is not int or v < 1]
    if bad:
        raise ValueError(f"{path}: {bad[0]} {config[bad[0]]} is not a positive number (nor, for sample_size, [size, size])")
    settings = {**DIFFUSERS, **config}
    wrong = [f"{k} {settings[k]}, not {v}" for k, v in HO_LAYOUT.items() if settings[k] != v]
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"} or up != [t.replace("Down", "Up") for t in reversed(down)]:
        wrong.append(f"blocks {', '.join(down + up)}")
    if config["out_channels"] != config["in_channels"] or min(channels) < 128 or any(c % 32 for c in channels):
        wrong.append(f"{config['in_channels']} channels in, {config['out_channels']} out, widths {channels}")
    if wrong:  # the only one HoUNet has
        left_out = "; a setting left out is UNet2DModel's default" * any(k not in config and v != HO_LAYOUT[k]
                                                                          for k, v in DIFFUSERS.items())
        raise ValueError(f"{path} is a UNet2DModel, but not in Ho et al.'s layout ({'; '.join(wrong)}{left_out})")
    try:
        check_image_size(size, len(channels))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return dict(in_channels=config["in_channels"], channels=channels, attention=[t != "DownBlock2D" for t in down],
                num_res=config["layers_per_block"], neck_length=0, time_emb_dim=channels[0],
                dropout=settings.get("dropout", 0.0), num_classes=0, layout="ho"), size


def diffusion(scheduler, path):
    """A diffusers DDPMScheduler config (its defaults where it says nothing) as a checkpoint's
    diffusion settings; a setting this code has no equivalent for is refused, by name."""
    s = {**SCHEDULER, **scheduler}
    T = s["num_train_timesteps"]
    schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(str(s["beta_schedule"]))
    variance = {"fixed_small": "small", "fixed_large": "large"}.get(str(s["variance_type"]).removesuffix("_log"))
    objective = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(str(s["prediction_type"]))
    ho = lambda key, times_T: schedule != "linear" or type(T) is int and type(s[key]) in (int, float) and \
        math.isclose(s[key] * T, times_T, rel_tol=1e-5)  # Ho et al.'s betas: linear from 0.1/T to 20/T
    has = {"num_train_timesteps": (type(T) is int and T > 0, "a positive number"),
           "beta_schedule": (schedule, "linear or squaredcos_cap_v2"),
           "beta_start": (ho("beta_start", 0.1), "0.1 / num_train_timesteps with a linear beta_schedule"),
           "beta_end": (ho("beta_end", 20), "20 / num_train_timesteps with a linear beta_schedule"),
           "variance_type": (variance, "fixed_small or fixed_large"),
           "prediction_type": (objective, "epsilon, v_prediction or sample"),
           "trained_betas": (s["trained_betas"] is None, "none: betas linear or cosine"),
           "thresholding": (not s["thresholding"], "false: x0 is clipped, not thresholded"),
           "clip_sample_range": (s["clip_sample_range"] == 1 or not s["clip_sample"], "1: x0 is clipped to [-1, 1]"),
           "rescale_betas_zero_snr": (not s["rescale_betas_zero_snr"], "false")}
    refused = next((k for k, (ok, _) in has.items() if not ok), None)
    if refused:
        raise ValueError(f"{path}: {refused} {reprlib.repr(s[refused])} has no equivalent here "
                         f"(this code takes {has[refused][1]})")
    return {"T": T, "schedule": schedule, "objective": objective, "variance": variance, "clip": bool(s["clip_sample"])}


def state_dict(state):
    """diffusers' UNet2DModel weights under HoUNet's names: to_q, to_k and to_v joined into qkv,
    and the attention's linear layers as the 1x1 convs they are here."""
    renamed = {}
    for key, value in state.items():
        for pattern, new in RENAMES:
            key = re.sub(pattern, new, key)
        renamed[key] = value
    for key in [k for k in renamed if ".q." in k]:
        prefix, kind = key.split(".q.")
        if all(f"{prefix}.{n}.{kind}" in renamed for n in "kv"):  # else a tensor the network has not
            renamed[f"{prefix}.qkv.{kind}"] = torch.cat([renamed.pop(f"{prefix}.{n}.{kind}") for n in "qkv"])
    return {k: v[..., None, None] if k.endswith(("qkv.weight", ".out.weight")) and v.ndim == 2 else v
            for k, v in renamed.items()}
