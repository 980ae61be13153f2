"""Benchmark: network forwards, seconds per TDM iteration and memory, ours vs the official call pattern.

    python benchmark.py                       # small random DiT on CPU (seconds)
    python benchmark.py --teacher sd15        # small random UNet (SD1.5 layout) on CPU; --teacher sdxl likewise
    python benchmark.py --teacher sdxl --full-size --resolution 1024 --device cuda --checkpointing --lora 64
    python benchmark.py --full-size --device cuda   # PixArt-XL-2 512 random weights on a GPU, with peak memory
    python benchmark.py --full-size --resolution 1024 --device cuda --checkpointing   # 1024-MS
    python benchmark.py --cpu-rss                   # measured CPU peak memory, full vs LoRA (52.8M-param DiT)
    python benchmark.py --memory-only               # computed weights+grads+AdamW of PixArt-XL-2 (meta device)
    python benchmark.py --memory-only --teacher sdxl   # the same for the SDXL UNet
    python benchmark.py --precision                 # x0 error of bf16 autocast against fp32 at high t
    torchrun --standalone --nproc_per_node 8 benchmark.py --parallel --full-size --device cuda   # hooks vs DDP vs FSDP2

The official pattern (train_tdm_demo.py, docs/method.md §9) rolls out all K steps, recomputes the
student prediction in the fake phase, calls the teacher there without using the result, and runs the
conditional and unconditional teacher passes separately. Ours is tdm.tdm_step. Both are timed on the
same networks in one run; ratios are what to read. Forwards are counted in network rows (samples).
"""
import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from math import nan

import torch
import torch.distributed as dist

import parallel
import tdm
from models import trainable_lora_views
from pixart import PixArtConfig, dit_from_config, pixart_xl_2_1024_ms_config, pixart_xl_2_512_config
from sample import student_x0
from teachers import TEACHERS, copy_network, x0_from_prediction
from unet import UNetConfig, sd15_unet_config, sdxl_base_unet_config, unet_from_config


#################################################################################
#                          Networks benchmarked                                 #
#################################################################################

# teacher -> (build from a config, small CPU config, full-size config at a resolution). Small: a DiT of 4 layers,
# hidden 128; UNets of widths 32 / 64 / 64 in each release's block layout.
_SMALL_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4, norm_num_groups=8,
                   sample_size=16)
NETWORKS = {
    "pixart": (dit_from_config,
               PixArtConfig(num_layers=4, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128,
                            sample_size=16, caption_channels=64),
               lambda res: pixart_xl_2_1024_ms_config() if res == 1024 else pixart_xl_2_512_config()),
    "sd15": (unet_from_config,
             UNetConfig(**_SMALL_UNET, cross_attention_dim=64,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
             lambda res: sd15_unet_config()),
    "sdxl": (unet_from_config,
             UNetConfig(**_SMALL_UNET, cross_attention_dim=128, transformer_layers_per_block=(1, 2, 2),
                        use_linear_projection=True, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                      "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        addition_embed_type="text_time", addition_time_embed_dim=16,
                        projection_class_embeddings_input_dim=64 + 6 * 16),
             lambda res: sdxl_base_unet_config())}


def random_conditions(config, batch, device):
    """(cond, uncond) of random text embeddings in the teacher's layout: PixArt (T5 rows (B, 120, d), mask: 20 and
    1 valid tokens), SD1.5 (CLIP context (B, 77, d)), SDXL (context, pooled)."""
    if isinstance(config, PixArtConfig):
        L = 120
        return tuple((torch.randn(batch, L, config.caption_channels, device=device),
                      (torch.arange(L, device=device) < n).long().expand(batch, L).contiguous()) for n in (20, 1))
    context = lambda: torch.randn(batch, 77, config.cross_attention_dim, device=device)
    if config.addition_embed_type != "text_time":
        return context(), context()
    return tuple((context(), torch.randn(batch, config.pooled_text_dim, device=device)) for _ in range(2))


def official_step(student, fake, teacher, cond, uncond, opt_student, opt_fake, config):
    """The official demo's call pattern, with the same maths as tdm.tdm_step (kept only for this comparison)."""
    c, sch = config, teacher.schedule
    B, device = tdm._batch_size_and_device(cond)
    grid = tdm.time_grid(c.K, c.t_max)
    t_next = tdm.landing_times(grid)
    stu = lambda x, t, cnd: student(x, t, cnd, None)
    x_T = torch.randn((B, *teacher.sample_shape), device=device)
    xs, _, _ = tdm.rollout(stu, x_T, cond, sch, grid)                        # all K steps, always
    # fake phase: recompute the student's prediction, plus a teacher call whose result is never used
    k = torch.randint(c.K, (B,), device=x_T.device)
    t_g, t_m = tdm._step_times(k, grid, t_next)
    x_g = tdm._gather(xs, k)
    with torch.no_grad():
        x0_hat = stu(x_g, t_g, cond)
        eps_hat = tdm.eps_from_x0(x_g, x0_hat, sch, t_g)
        tau = tdm.sample_tau(t_g, t_m, c.separate, c.t_max)
        z = torch.randn_like(x_g)
        x_tau, _, _ = tdm.rediffuse(tdm.ddim_step(x0_hat, eps_hat, sch, t_m), sch, t_m, tau, z)
        w_is = tdm.importance_weight(eps_hat, z, sch, t_m, tau)
        teacher.denoise(x_tau, tau, cond)                                   # unused
    loss = tdm.fake_score_loss(fake(x_tau, tau, cond, None), x0_hat, sch, tau, w_is)
    opt_fake.zero_grad(set_to_none=True)
    loss.backward()
    opt_fake.step()
    # generator phase: cond and uncond teacher passes separately
    k = torch.randint(c.K, (B,), device=x_T.device)
    t_g, t_m = tdm._step_times(k, grid, t_next)
    x_g = tdm._gather(xs, k)
    x0_hat = stu(x_g, t_g, cond)
    with torch.no_grad():
        x_m = tdm.ddim_step(x0_hat, tdm.eps_from_x0(x_g, x0_hat, sch, t_g), sch, t_m)
        tau = tdm.sample_tau(t_g, t_m, c.separate, c.t_max)
        x_tau, _, _ = tdm.rediffuse(x_m, sch, t_m, tau, torch.randn_like(x_m))
        r_c, r_u = teacher.denoise(x_tau, tau, cond), teacher.denoise(x_tau, tau, uncond)
        f = fake(x_tau, tau, cond, None)
    loss = tdm.generator_loss(x0_hat, r_u + c.cfg * (r_c - r_u), f)
    opt_student.zero_grad(set_to_none=True)
    loss.backward()
    tdm._clip(opt_student, c.grad_clip)
    opt_student.step()


def state_gib(nets):
    """Weights + gradients + AdamW states of the distinct parameters of `nets`, in GiB (activations excluded).

    Computed from the tensors' sizes and dtypes, so it works on the meta device: a trainable parameter adds a
    gradient of its own dtype and two fp32 AdamW moments.
    """
    params = {id(p): p for n in nets for p in n.parameters()}.values()
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.numel() * (p.element_size() + 8) for p in params if p.requires_grad)
    return total / 2 ** 30


def memory_table(config, lora, dtype, build=dit_from_config):
    """Computed weights + grads + AdamW GiB of full fine-tuning (three fp32 copies, as train.py) vs LoRA on one
    shared base in `dtype`."""
    with torch.device("meta"):
        net = build(config).requires_grad_(False)
        copies = [copy_network(net) for _ in range(2)]
        full = state_gib([net, *copies])
        net = net.to(dtype)
        trainable_lora_views(net, lora)
        shared = state_gib([net])
    n = sum(p.numel() for p in copies[0].parameters())
    return dict(params=n, full=full, lora=shared)


class RowCounter:
    """Counts the rows (samples) and calls through the forward of some modules."""
    def __init__(self, modules):
        self.rows = self.calls = 0
        self.handles = [m.register_forward_pre_hook(self.hook) for m in modules]

    def remove(self):
        for h in self.handles:
            h.remove()

    def hook(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1


def setup(config, device, lora, dtype, batch, autocast=None, name="pixart", resolution=None, engine=None):
    """Teacher around a random network, student/fake (two copies, or two adapters of one base), optimisers, conds.
    `engine` (under torchrun): parallel.parallelise's mode, applied before the optimisers are built."""
    torch.manual_seed(0)
    # As train.py: LoRA adapters on a base in `dtype` (bf16 on GPU); a full fine-tune copies an fp32 teacher.
    net = NETWORKS[name][0](config, device=device).to(dtype if lora else torch.float32)
    teacher = TEACHERS[name].from_network(net, resolution=resolution, autocast=autocast)   # per-call autocast
    if lora:
        student, fake = trainable_lora_views(net, lora)
        nets = [net]
    else:
        student, fake = copy_network(net), copy_network(net)
        nets = [net, student, fake]
    calls = (student, fake)
    if engine:
        calls = parallel.parallelise(student, fake, teacher, engine, dist.get_world_size(), dist.get_rank(), 0)
    opt_s = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.0, 0.95))
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-6, betas=(0.0, 0.95))
    cond, uncond = random_conditions(config, batch, device)
    return teacher, *(student_x0(teacher, n) for n in calls), opt_s, opt_f, cond, uncond, nets


def measure(step, args, config, device, lora, dtype, name="pixart", resolution=None, engine=None):
    autocast = torch.bfloat16 if device.type == "cuda" else None
    teacher, student, fake, opt_s, opt_f, cond, uncond, nets = setup(config, device, lora, dtype, args.batch, autocast,
                                                                     name, resolution, engine)
    if args.checkpointing:
        for n in nets:
            n.gradient_checkpointing = True
    # data parallel rows: every engine makes the same calls (lockstep rollouts, as FSDP needs), so only it differs
    tdm_config = tdm.TDMConfig(K=4, cfg=TEACHERS[name].DEFAULTS["cfg"], lockstep=engine is not None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step(student, fake, teacher, cond, uncond, opt_s, opt_f, tdm_config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    counter = RowCounter(nets)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step(student, fake, teacher, cond, uncond, opt_s, opt_f, tdm_config)
    sync()
    sec = (time.perf_counter() - t0) / args.iters
    counter.remove()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return dict(rows=counter.rows / args.iters / args.batch, calls=counter.calls / args.iters, sec=sec, peak=peak,
                state=state_gib(nets))


def per_gpu_memory(config, world, build=dit_from_config):
    """Computed GiB per GPU of a full fine-tune on `world` GPUs (weights, grads, fp32 AdamW; activations
    excluded). DDP: the fp32 teacher, student and fake whole, plus DDP's gradient buckets (a second copy of the
    trainable gradients). FSDP2: 1/world of each sharded network, plus what is gathered at once: the root's
    parameters and two units (the running one and the prefetched next), fp32."""
    with torch.device("meta"):
        net = build(config).requires_grad_(False)                      # the fp32 teacher, as train.py holds it
        copy = copy_network(net)                                       # student or fake
    gib = lambda modules: sum(p.numel() * p.element_size() for m in modules for p in m.parameters()) / 2 ** 30
    teacher, trainable, grads = state_gib([net]), 2 * state_gib([copy]), 2 * gib([copy])
    units = parallel.shard_units(copy)
    gathered = gib([copy]) - gib(units) + 2 * max(gib([u]) for u in units)
    return dict(params=sum(p.numel() for p in net.parameters()), world=world, ddp=teacher + trainable + grads,
                fsdp=(teacher + trainable) / world + gathered, fsdp_replicate=teacher + trainable / world + gathered)


def parallel_table(args, config, device, dtype):
    """Under torchrun: seconds per TDM iteration of each data-parallel engine on the same networks (the hooks, DDP;
    full fine-tune and LoRA; FSDP2 full). Each rank runs --batch samples; rank 0 prints."""
    rank, world, device = parallel.init_distributed(device)
    if world == 1:
        raise SystemExit("benchmark.py --parallel: run it under torchrun, e.g. torchrun --standalone "
                         "--nproc_per_node 2 benchmark.py --parallel")
    rows = {}
    for engine, lora in (("hooks", 0), ("ddp", 0), ("fsdp", 0), ("hooks", 1), ("ddp", 1)):
        r = measure(tdm.tdm_step, args, config, device, lora and args.lora, dtype, args.teacher, None, engine)
        rows[f"{engine}, {'LoRA' if lora else 'full'}"] = r
    if rank == 0:
        print(f"{describe(config)}, {world} processes x batch {args.batch}, K=4, device {device.type}")
        for name, r in rows.items():
            print(f"  {name:12s} {r['sec']:8.3f} s/iter  ({r['sec'] / rows['hooks, ' + name.split(', ')[1]]['sec']:.2f}"
                  "x the hooks)")
    dist.destroy_process_group()
    return rows


PATTERNS = [("official pattern, full", official_step, 0), ("ours (tdm_step), full", tdm.tdm_step, 0),
            ("ours (tdm_step), LoRA", tdm.tdm_step, 1)]
RSS_CONFIG = PixArtConfig(num_layers=12, num_attention_heads=8, attention_head_dim=64, cross_attention_dim=512,
                          sample_size=8, caption_channels=256)


def cpu_rss_table(args):
    """Peak resident memory of each pattern, each in a fresh process (CPU fp32; weights and AdamW dominate)."""
    out = {}
    for i, (name, _, _) in enumerate(PATTERNS):
        cmd = [sys.executable, __file__, "--device", "cpu", "--row", str(i), "--batch", "1", "--iters", "1",
               "--warmup", "0", "--lora", str(args.lora), "--rss-config"]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        out[name] = (r["rss"] - r["rss0"]) / 2 ** 20                     # KiB -> GiB
    n = sum(p.numel() for p in dit_from_config(RSS_CONFIG).parameters())
    print(f"DiT: 12 layers, hidden 512, {n:,} parameters, fp32 on CPU; peak RSS above the bare process, measured:")
    full = out["ours (tdm_step), full"]
    for name, gib in out.items():
        print(f"  {name:24s} {gib:6.2f} GiB  ({gib / full:.2f}x ours full)")
    return out


@torch.no_grad()
def precision_table(args, times=(224, 449, 674, 889), batch=8):
    """x0 error of bf16 autocast against fp32 on one random DiT (docs/method.md §12). Two bf16 columns: as this
    code runs (the output projection and the x0 conversion in fp32), and with eps rounded to bf16 before the
    conversion (what a bf16 output projection hands over); and fp16 autocast (the official code's mixed precision,
    8 times finer than bf16). Errors are RMS over all latent elements."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = pixart_xl_2_512_config() if args.full_size else RSS_CONFIG
    net = dit_from_config(config).to(device).eval()
    teacher = TEACHERS["pixart"].from_network(net)                 # its call and schedule; autocast set below
    shape = (batch, *teacher.sample_shape)
    cond = (torch.randn(batch, 16, config.caption_channels, device=device),
            torch.ones(batch, 16, dtype=torch.long, device=device))
    rms = lambda z: z.double().pow(2).mean().sqrt().item()
    print(f"DiT: {config.num_layers} layers, hidden {config.hidden_size}, random weights, batch {batch}, {device}; "
          f"x_t = alpha x0 + sigma eps with x0, eps ~ N(0, I)")
    print(f"{'t':>4s} {'sigma/alpha':>11s} {'eps err':>9s} {'x0 err':>9s} {'x0 err, eps rounded to bf16':>28s} "
          f"{'x0 err, fp16 autocast':>22s}")
    rows = {}
    for t_int in times:
        t = torch.full((batch,), t_int, device=device)
        a, s = teacher.schedule.alpha(t)[0].item(), teacher.schedule.sigma(t)[0].item()
        x_t = a * torch.randn(shape, device=device) + s * torch.randn(shape, device=device)
        out = {}                                                   # the network's raw output, one forward each
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out[name] = teacher.call(net, x_t, t, cond)      # (B, 8, h, w) fp32: eps and variance
        x0 = {k: x0_from_prediction(v, x_t, teacher.schedule, t, "epsilon+variance") for k, v in out.items()}
        eps_bf16 = out["bf16"][:, :4]
        rounded = x0_from_prediction(eps_bf16.bfloat16().float(), x_t, teacher.schedule, t, "epsilon")
        r = dict(ratio=s / a, eps=rms(eps_bf16 - out["fp32"][:, :4]), x0=rms(x0["bf16"] - x0["fp32"]),
                 x0_rounded=rms(rounded - x0["fp32"]), x0_fp16=rms(x0["fp16"] - x0["fp32"]))
        rows[t_int] = r
        print(f"{t_int:4d} {r['ratio']:11.1f} {r['eps']:9.2e} {r['x0']:9.2e} {r['x0_rounded']:28.2e} "
              f"{r['x0_fp16']:22.2e}")
    return rows


def describe(config, resolution=None):
    """One line naming the benchmarked network and its latent side."""
    n = sum(p.numel() for p in (dit_from_config if isinstance(config, PixArtConfig) else unet_from_config)(
        config, device="meta").parameters())
    side = resolution // 8 if resolution else config.sample_size
    if isinstance(config, PixArtConfig):
        return f"DiT: {config.num_layers} layers, hidden {config.hidden_size}, latent {side}^2, {n:,} parameters"
    return f"UNet: widths {list(config.block_out_channels)}, latent {side}^2, {n:,} parameters"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="pixart", choices=list(NETWORKS), help="whose network: the PixArt DiT or "
                   "the SD1.5 / SDXL UNet")
    p.add_argument("--full-size", action="store_true", help="the release config (PixArt-XL-2, SD1.5, SDXL base; "
                   "random weights; needs a GPU)")
    p.add_argument("--resolution", type=int, choices=(512, 1024), default=None, help="--full-size: pixels; PixArt "
                   "512 (XL-2-512x512) or 1024 (XL-2-1024-MS); SD1.5 512; SDXL 1024 (default: the release's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=12, help="untimed iterations first. Ours runs the rollout's later "
                   "steps on the samples still going (a new batch size almost every call) and the first call at each "
                   "size pays one-off GPU set-up: with 1 warm-up it looked 0.91x official on an H100, with 12 0.76x")
    p.add_argument("--lora", type=int, default=64, help="rank for the LoRA-on-shared-base rows")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the computed memory table of PixArt-XL-2 "
                   "(meta device: no weights, no GPU, seconds)")
    p.add_argument("--cpu-rss", action="store_true", help="measured CPU peak memory: each pattern in its own "
                   "process on a 53M-parameter DiT (12 layers, hidden 512), peak RSS above the bare process's")
    p.add_argument("--precision", action="store_true", help="x0 error of bf16 autocast against fp32 at t = 224 ... "
                   "889 on a random DiT (12 layers, hidden 512; --full-size: PixArt-XL-2)")
    p.add_argument("--gpus", type=int, default=8, help="--memory-only: GPUs of the per-GPU rows (DDP, FSDP2)")
    p.add_argument("--parallel", action="store_true", help="under torchrun: s/iter of the data-parallel engines "
                   "(hooks, DDP, FSDP2) on the same networks")
    p.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)   # internal: one row, print JSON
    p.add_argument("--rss-config", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution and not args.full_size:
        p.error("--resolution is for the release configs: use it with --full-size")
    if (args.cpu_rss or args.precision) and args.teacher != "pixart":
        p.error("--cpu-rss and --precision measure the DiT: drop --teacher")
    build, small, full = NETWORKS[args.teacher]
    if args.cpu_rss:
        return cpu_rss_table(args)
    if args.precision:
        return precision_table(args)
    if args.memory_only:
        m = memory_table(full(args.resolution), args.lora, torch.bfloat16, build)
        what = {"pixart": "PixArt-XL-2", "sd15": "The SD1.5 UNet", "sdxl": "The SDXL base UNet"}[args.teacher]
        print(f"{what} ({m['params']:,} parameters) as train.py holds it; weights, grads and fp32 AdamW states, "
              f"computed, activations excluded (the same at any resolution):")
        print(f"  full fine-tune (fp32 teacher + student + fake) {m['full']:6.1f} GiB")
        print(f"  LoRA rank {args.lora} on one shared base          {m['lora']:6.1f} GiB  "
              f"({m['lora'] / m['full']:.2f}x full)")
        g = per_gpu_memory(full(args.resolution), args.gpus, build)
        print(f"full fine-tune on {args.gpus} GPUs, per GPU: DDP {g['ddp']:.1f} GiB (with its gradient buckets); FSDP2 "
              f"{g['fsdp']:.1f} GiB (teacher sharded), {g['fsdp_replicate']:.1f} GiB (teacher replicated)")
        return dict(m, per_gpu=g)
    if args.parallel:
        return parallel_table(args, full(args.resolution) if args.full_size else small, torch.device(args.device),
                              torch.bfloat16 if args.device == "cuda" else torch.float32)
    device = torch.device(args.device)
    config = full(args.resolution) if args.full_size else RSS_CONFIG if args.rss_config else small
    resolution = args.resolution if args.full_size else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = {}
    for i, (name, step, lora) in enumerate(PATTERNS):
        if args.row is not None and args.row != i:
            continue
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux: the bare process
        try:
            rows[name] = measure(step, args, config, device, lora and args.lora, dtype, args.teacher, resolution)
        except torch.cuda.OutOfMemoryError:                              # report it and go on to the next row
            rows[name] = dict(rows=nan, calls=nan, sec=nan, peak=float("inf"), state=nan)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.row is not None:
            print(json.dumps(dict(rows[name], rss0=rss0, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
            return rows
    print(f"{describe(config, resolution)}, batch {args.batch}, K=4, cfg {TEACHERS[args.teacher].DEFAULTS['cfg']:g}, "
          f"device {device}")
    print(f"{'':24s} {'rows/sample':>11s} {'calls':>6s} {'s/iter':>8s} {'peak GiB':>9s} {'state GiB':>10s}")
    for name, r in rows.items():
        peak = "OOM" if r["peak"] == float("inf") else f"{r['peak']:.2f}"
        print(f"{name:24s} {r['rows']:11.2f} {r['calls']:6.1f} {r['sec']:8.3f} {peak:>9s} {r['state']:10.4f}")
    print("(peak: measured, cuda only, OOM = out of memory; state: weights + grads + AdamW states, computed)")
    o, u = rows["official pattern, full"], rows["ours (tdm_step), full"]
    print(f"ours / official: forwards {u['rows'] / o['rows']:.2f}, seconds {u['sec'] / o['sec']:.2f}")
    return rows


if __name__ == "__main__":
    main()
