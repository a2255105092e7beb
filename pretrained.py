"""
Ho et al. 2020's published networks (google/ddpm-cifar10-32, google/ddpm-ema-church-256, ...),
from the Hugging Face hub or a folder in diffusers' format, as checkpoints of this code: the
network in model.HoUNet, its weights renamed, its DDPM scheduler's settings as the diffusion's.
checkpoint.load (so sample.py, fid.py, edit.py and train.py --init-from) reads them through
`checkpoint`; the hub's library is imported only when a hub name is given.
"""
import json
import os
import re

import torch

import common
from model import check_image_size

# diffusers' UNet2DModel settings that make Ho et al.'s network (those of the google/ddpm-* configs)
HO_LAYOUT = {"act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
             "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6,
             "norm_num_groups": 32, "time_embedding_type": "positional", "class_embed_type": None,
             "num_class_embeds": None, "resnet_time_scale_shift": "default", "add_attention": True,
             "downsample_type": "conv", "upsample_type": "conv", "mid_block_type": "UNetMidBlock2D"}
SUPPORTED = "only pixel-space UNet2DModel networks in Ho et al.'s layout (google/ddpm-*) can be loaded"
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
    get, unet = files(name)
    config = json.load(open(get(unet + "config.json")))
    model_config = ho_config(config, name)
    scheduler = get("scheduler/scheduler_config.json") or get(unet + "scheduler_config.json")
    weights = get(unet + "diffusion_pytorch_model.safetensors") or get(unet + "diffusion_pytorch_model.bin")
    if weights is None:
        raise FileNotFoundError(f"{name} has a config.json but no diffusion_pytorch_model.safetensors or .bin")
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(weights)
    else:
        state = common.safe_load(weights, weights, "weights file")
    return {"ema": state_dict(state), "model_config": model_config, "step": 0, "classes": [],
            "diffusion": diffusion(json.load(open(scheduler)) if scheduler else {}, name),
            "args": {"image_size": config["sample_size"], "dataset": None, "data_dir": None}}


def files(name):
    """(get, subfolder): get(file) is a local path to the model's `file`, or None where it has
    none; its network's files are in `subfolder` ("", or "unet/" in a pipeline's layout)."""
    if os.path.isdir(name):
        get = lambda file: os.path.join(name, file) if os.path.isfile(os.path.join(name, file)) else None
    else:  # a hub name
        from huggingface_hub import errors, hf_hub_download
        from huggingface_hub.utils import logging
        logging.set_verbosity_error()  # no retry messages: one line if it fails

        def get(file):
            try:
                return hf_hub_download(name, file)
            except errors.RemoteEntryNotFoundError:
                return None
            except errors.RepositoryNotFoundError:
                raise FileNotFoundError(f"no model {name} on the Hugging Face hub, nor a file or folder {name} "
                                        "here") from None
            except OSError as e:
                raise OSError(f"could not download {name} from the Hugging Face hub, and it is not in the hub's "
                              f"cache ({type(e).__name__}: no network?)") from None
    pipeline = get("model_index.json")
    latent = [k for k in ("vae", "vqvae") if pipeline and k in json.load(open(pipeline))]
    if latent:
        raise ValueError(f"{name} is a latent diffusion pipeline (it has a {latent[0]}): {SUPPORTED}")
    for unet in ("", "unet/"):
        if get(unet + "config.json"):
            return get, unet
    if os.path.isdir(name):
        raise FileNotFoundError(f"{name} is a folder without a config.json (nor unet/config.json): give a checkpoint "
                                f"file, e.g. {os.path.join(name, 'ckpt.pt')}, or a model folder in diffusers' format")
    raise FileNotFoundError(f"{name} has no config.json (nor unet/config.json) on the Hugging Face hub")


def ho_config(config, name):
    """model.UNetConfig's fields for a diffusers UNet2DModel config in Ho et al.'s layout."""
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"{name} is a {config.get('_class_name', 'model of no known class')}: {SUPPORTED}")
    down, up, channels = config["down_block_types"], config["up_block_types"], config["block_out_channels"]
    wrong = [f"{k} {config[k]}, not {v}" for k, v in HO_LAYOUT.items() if config.get(k, v) != v]
    if set(down) - {"DownBlock2D", "AttnDownBlock2D"} or up != [t.replace("Down", "Up") for t in reversed(down)]:
        wrong.append(f"blocks {', '.join(down + up)}")
    if config["out_channels"] != config["in_channels"] or min(channels) < 128:
        wrong.append(f"{config['in_channels']} channels in, {config['out_channels']} out, widths {channels}")
    if wrong:
        raise ValueError(f"{name} is a UNet2DModel, but not in Ho et al.'s layout ({'; '.join(wrong)}): {SUPPORTED}")
    check_image_size(config["sample_size"], len(channels))
    return dict(in_channels=config["in_channels"], channels=list(channels), attention=[t != "DownBlock2D" for t in down],
                num_res=config["layers_per_block"], neck_length=0, time_emb_dim=channels[0],
                dropout=config.get("dropout", 0.0), num_classes=0, layout="ho")


def diffusion(scheduler, name):
    """A diffusers DDPMScheduler config (its defaults where it says nothing) as a checkpoint's
    diffusion settings; a schedule other than Ho et al.'s linear one or the cosine is refused."""
    T = scheduler.get("num_train_timesteps", 1000)
    schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(scheduler.get("beta_schedule", "linear"))
    ends = torch.tensor([scheduler.get("beta_start", 1e-4), scheduler.get("beta_end", 0.02)])
    variance = {"fixed_small": "small", "fixed_large": "large"}.get(scheduler.get("variance_type", "fixed_small").removesuffix("_log"))
    objective = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(scheduler.get("prediction_type", "epsilon"))
    if (None in (schedule, variance, objective) or scheduler.get("trained_betas")
            or schedule == "linear" and not torch.allclose(ends, torch.tensor([0.1, 20]) / T)):
        raise ValueError(f"{name}'s scheduler is not one this code has (betas linear from 0.1/T to 20/T, or cosine; "
                         f"variance fixed_small or fixed_large; epsilon, v or sample prediction): {scheduler}")
    return {"T": T, "schedule": schedule, "objective": objective, "variance": variance,
            "clip": scheduler.get("clip_sample", True)}


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
        renamed[f"{prefix}.qkv.{kind}"] = torch.cat([renamed.pop(f"{prefix}.{n}.{kind}") for n in "qkv"])
    return {k: v[..., None, None] if k.endswith(("qkv.weight", ".out.weight")) and v.ndim == 2 else v
            for k, v in renamed.items()}
