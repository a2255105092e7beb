"""
Benchmark the real training step (train.py) and the real sampler (diffusion.py).

    python bench.py --preset cifar10 --batch-size 16                  # fp32 on the CPU
    python bench.py --preset cifar10 --batch-size 16 --dtype bfloat16
    python bench.py --preset celeba --device cuda --compile           # GPU
    python bench.py --preset mnist5k --channels 32,64,128             # any train.py model flag
    python bench.py --preset ho-cifar10 --batch-size 4                # Ho et al.'s network
    python bench.py --preset cifar10 --batch-size 128 --device cuda --dtype bfloat16 --compile \
        --compile-mode reduce-overhead --run-steps 200              # the loop as it runs, on a GPU

Prints parameters, forward GFLOP per image, training images/s and MFU (3 x forward FLOPs x
images/s over a matmul peak measured in the same run, in the same precision), sampling ms
per network evaluation per image (DDIM), and peak memory. With --run-steps N, also N
consecutive training steps with no sync between them, as train.py's loop runs them: images/s
and, on a GPU, the busy fraction (the profiler's summed kernel time over the wall time), with
any host read of a device value in a step an error (torch.cuda.set_sync_debug_mode).
"""
import copy
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as fc

import common
import train
from data import DATASETS
from diffusion import Diffusion
from model import build_unet, check_image_size

PRESET = "cifar10"  # the model of a train.py preset: mnist5k | mnist | cifar10 | celeba | folder | ho-cifar10
BATCH_SIZE = 16  # training batch
DEVICE = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
DTYPE = "float32"  # float32 | bfloat16 | float16 (autocast)
COMPILE = False  # torch.compile the model
COMPILE_MODE = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile's mode
RUN_STEPS = 0  # > 0: also time this many consecutive training steps, no sync between them
STEPS = 5  # timed training steps (after 2 warm-up steps); sampling times STEPS x 4 evaluations
SAMPLE_BATCH = 8  # images per sampling batch

# FlopCounterMode has no formula for the CPU flash-attention kernel behind
# scaled_dot_product_attention: without this, attention FLOPs count as zero.
for name, formula in [("_scaled_dot_product_flash_attention_for_cpu",
                       lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)),
                      ("_scaled_dot_product_flash_attention_for_cpu_backward",
                       lambda go, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(go, q, k, v))]:
    op = getattr(torch.ops.aten, name, None)
    if op is not None and op not in fc.flop_registry:
        fc.register_flop_formula(op)(formula)


def synchronize(device):  # GPU work is asynchronous: wait for it before reading the clock
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(fn, reps, device, warmup=2, pick=statistics.median):
    """The median (or `pick`) of reps timed calls of fn, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return pick(times)


def consecutive(step, n, device):
    """Wall seconds of n calls of step with no sync between them (after 3 warm-up calls: compile,
    CUDA graph capture), and on a GPU the busy fraction: the kernels' summed time, from the
    profiler in a second pass, over that pass's wall time. A host read in a step raises there."""
    def steps():
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    for _ in range(3):
        step()
    wall = seconds(steps, 1, device, warmup=0)
    if device.type != "cuda":
        return wall, None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        profiled = seconds(steps, 1, device, warmup=0)
    kernels = sum(e.self_device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return wall, kernels / 1e6 / profiled


def matmul_peak(device, dtype):
    """GFLOP/s of the fastest of 10 n^3 matmuls: the MFU denominator (on the CPU run as a 1x1
    convolution, on oneDNN like the model's convolutions; the best run, as other processes
    on a shared machine only ever slow it down). n is 2048 on the CPU and 8192 on a GPU, where
    a 2048^3 product takes tens of microseconds and the synchronisation around it counts."""
    n = 2048 if device.type == "cpu" else 8192
    if device.type == "cpu":
        x, w = torch.randn(1, n, n, 1, dtype=dtype), torch.randn(n, n, 1, 1, dtype=dtype)
        fn = lambda: F.conv2d(x, w)
    else:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        fn = lambda: a @ b
    return 2 * n ** 3 / seconds(fn, 10, device, pick=min) / 1e9


def forward_flops(model, config, size, device):
    x = torch.randn(1, config.in_channels, size, size, device=device)
    with torch.no_grad(), fc.FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, dtype=torch.long, device=device))
    return counter.get_total_flops()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # in KiB on Linux, in bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 1024)


def parse_args(argv=None):
    """A flag per constant above; the other flags are train.py's model flags."""
    p = common.add_flags(common.parser(__doc__, "Any other flag is one of train.py's (python train.py --help), "
                                                "e.g. --channels 32,64,64 --attention 0,0,1 --timesteps 1000"),
                         globals(), PRESET=dict(choices=sorted(train.PRESETS)),
                         DTYPE=dict(choices=("float32", "bfloat16", "float16")), COMPILE=dict(dest="use_compile"),
                         COMPILE_MODE=dict(choices=("default", "reduce-overhead", "max-autotune")))
    args, model_flags = p.parse_known_args(argv)
    common.at_least(p, args, 1, "steps", "batch_size", "sample_batch")
    common.at_least(p, args, 0, "run_steps")
    # the preset and any model flags, read exactly as train.py reads them
    args.train = train.parse_args(["--preset", args.preset, "--batch-size", str(args.batch_size),
                                   "--device", args.device, "--dtype", args.dtype, *model_flags])
    return args


def bench(args):
    targs = args.train
    _, _, device = common.setup(targs.device)
    channels, size, _ = DATASETS[targs.dataset]
    size = targs.image_size or size
    config = train.unet_config(targs, channels)
    check_image_size(size, len(config.channels))
    torch.manual_seed(0)
    model = build_unet(config).to(device)
    diffusion = Diffusion(targs.timesteps, targs.schedule, targs.objective, device)
    dtype = common.amp_dtype(targs.dtype, device)
    peak = matmul_peak(device, dtype or torch.float32)  # bf16 autocast is measured against a bf16 peak
    if device.type == "cuda":  # the peak memory printed is the model's, not the 8192^2 matmuls'
        torch.cuda.reset_peak_memory_stats(device)
    flops = forward_flops(model, config, size, device)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {size} px, "
          f"{flops / 1e9:.3f} forward GFLOP/img | {device}, {dtype or torch.float32}, "
          f"{torch.get_num_threads()} threads, compile {args.use_compile} | matmul peak {peak:.1f} GFLOP/s")

    # the training step exactly as train.py runs it: train_step, then the EMA update (and with
    # `tally`, as in train.py's loop, the device-side totals a log line reads: --run-steps)
    ema = copy.deepcopy(model).requires_grad_(False)
    net = torch.compile(model, mode=args.compile_mode) if args.use_compile else model
    optimizer, scaler = train.make_optimizer(model, targs, device, dtype)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    x = torch.rand(args.batch_size, channels, size, size, device=device) * 2 - 1
    totals = common.zero_totals(device)

    def step(tally=False):
        nonlocal totals
        losses, t, grad_norm, skip, bad = train.train_step(net, diffusion, optimizer, scaler, params, x, None,
                                                           targs, dtype)
        train.update_ema(ema_params, params, 1000, targs.ema_decay, skip)
        if tally:
            totals = common.tally(totals, losses, t, grad_norm, skip, bad, 1000, targs.timesteps)
    step_seconds = seconds(step, args.steps, device)
    images = args.batch_size / step_seconds
    achieved = 3 * flops * images / 1e9
    print(f"train  batch {args.batch_size}: {step_seconds * 1e3:.1f} ms/step, {images:.1f} img/s, "
          f"{achieved:.1f} GFLOP/s, MFU {achieved / peak * 100:.1f}%")
    if args.run_steps:
        wall, busy = consecutive(lambda: step(tally=True), args.run_steps, device)
        print(f"loop   {args.run_steps} steps: {args.run_steps * args.batch_size / wall:.1f} img/s, " + (
            f"GPU busy {busy * 100:.1f}% of the wall time" if busy is not None else "(no GPU: no GPU time to measure)"))

    # the DDIM sampler from diffusion.py, timed per network evaluation
    ema.eval()
    shape, nfe = (args.sample_batch, channels, size, size), 4 * args.steps
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        per_nfe = seconds(lambda: diffusion.ddim_sample(ema, shape, nfe), 3, device, warmup=1) / nfe / args.sample_batch
    print(f"sample batch {args.sample_batch}, DDIM {nfe} steps: {per_nfe * 1e3:.2f} ms/NFE/img, "
          f"{flops / per_nfe / 1e9:.1f} GFLOP/s, MFU {flops / per_nfe / 1e9 / peak * 100:.1f}%")
    print(f"peak memory {peak_memory_mb(device):.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})")
    return {"images_per_s": images, "mfu": achieved / peak, "ms_per_nfe_per_image": per_nfe * 1e3}


def main(argv=None):
    return common.run(bench, parse_args(argv))


if __name__ == "__main__":
    main()
