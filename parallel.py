"""Data parallel training under torchrun: torch's DistributedDataParallel, FSDP2 (`fully_shard`), or per-parameter
all-reduce hooks; the per-rank noise streams; and checkpoint states gathered from, and scattered to, sharded networks.

    torchrun --standalone --nproc_per_node 8 train.py --teacher pixart --weights ... --lora 64     # DDP (default)
    torchrun --standalone --nproc_per_node 8 train.py --teacher sdxl --weights ... --parallel fsdp # full fine-tune

The semantics are the same in every mode (docs/method.md §14): --batch is the global batch, split evenly; every
process draws its own noise (seed + 1,000,003 * rank); gradients are averaged over the processes before clipping
and the optimiser step, so each step is the one a single process would take on the same global batch; rank 0
alone writes. Without torchrun (one process) the networks are trained as they are.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

MODES = ("ddp", "fsdp", "hooks")


#################################################################################
#                          Process group and noise streams                      #
#################################################################################

def init_distributed(device):
    """Under torchrun (RANK set): join the process group, one GPU per process. -> (rank, world, device).
    Without torchrun: (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started process {local} on a node where torch sees {torch.cuda.device_count()} "
                             "GPU(s): pass --nproc_per_node at most the number of GPUs (or set CUDA_VISIBLE_DEVICES)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # GPU tensors through NCCL, CPU ones (the NaN flag, RNG states) through gloo. Generous timeout: the other ranks
    # wait while rank 0 encodes a large prompt file or writes a checkpoint
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def rank0_first(rank, world):
    """Rank 0 runs the block first (it fills the disk caches: toy teacher fit, prompt embeddings), then the
    other ranks run it and find the caches filled."""
    if world > 1 and rank > 0:
        dist.barrier()
    yield
    if world > 1 and rank == 0:
        dist.barrier()


def rank_seed(seed, rank, iteration=0):
    """The seed of one process's own noise stream (rank 0 of a fresh run keeps `seed` itself)."""
    return seed + 1_000_003 * rank + iteration


def rng_states(device, world):
    """[the RNG states of every process] (one entry without torchrun), so a resume continues each stream."""
    s = dict(rng=torch.get_rng_state())
    if device.type == "cuda":
        s["cuda_rng"] = torch.cuda.get_rng_state(device).cpu()
    ranks = [s] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(ranks, s)
    return ranks


def set_rng_states(saved, device, rank, world, seed, iteration, log):
    """Restore the RNG streams of a checkpoint; if it was written by another number of processes, reseed
    (the run goes on, but not bit-exactly as an uninterrupted one would; likewise on another device type)."""
    ranks = saved.get("rank_rng") or [{k: saved[k] for k in ("rng", "cuda_rng") if k in saved}]   # or older format
    if len(ranks) != world:
        log(f"warning: the checkpoint was written by {len(ranks)} process(es), this run has {world}: "
            "reseeding each process; the resumed run is not bit-exact")
        torch.manual_seed(rank_seed(seed, rank, iteration))
        return
    if ("cuda_rng" in ranks[rank]) != (device.type == "cuda"):
        log(f"warning: the checkpoint was written on {'cuda' if 'cuda_rng' in ranks[rank] else 'cpu'}, this run is on "
            f"{device.type}: its noise comes from another generator; the resumed run is not bit-exact")
    torch.set_rng_state(ranks[rank]["rng"])
    if device.type == "cuda" and "cuda_rng" in ranks[rank]:
        torch.cuda.set_rng_state(ranks[rank]["cuda_rng"], device)


#################################################################################
#                          The three engines                                    #
#################################################################################

def parallelise(student, fake, teacher, mode, world, rank, seed, shard_teacher=True):
    """Make student and fake data parallel over the `world` processes. -> (student, fake) as tdm_step calls them.

    ddp:   each wrapped in DistributedDataParallel (gradients all-reduced in buckets, overlapped with backward).
           A LoRA view's parameters are its own adapter only, so DDP of the student view and DDP of the fake view
           each reduce their adapter; the frozen base is nobody's.
    fsdp:  full fine-tunes: parameters, gradients and AdamW states sharded over the processes (FSDP2), one unit
           per repeated block (`shard_units`); the frozen teacher too unless `shard_teacher` is False.
    hooks: a post-accumulate-grad hook all-reduces each gradient on its own (no buckets); kept as the baseline
           DDP is measured against (benchmark.py --parallel).
    The networks given stay the ones to save, sample and EMA: under ddp the wrappers are returned for training
    only; under fsdp the networks are sharded in place (their state_dict holds DTensor shards: `full_state`)."""
    if world == 1:
        return student, fake
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        student_call, fake_call = DDP(student), DDP(fake)        # rank 0's weights are broadcast on wrapping
    else:
        params = [p for net in (student, fake) for p in net.parameters()]
        for p in params:
            dist.broadcast(p.data, 0)                            # rank 0's weights everywhere
        if mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(params[0].device.type, (world,))      # where the networks are, not cuda:0
            for net in (student, fake) + ((teacher.network,) if shard_teacher else ()):
                shard(net, mesh)
        else:
            average_gradients(params, world)
        student_call, fake_call = student, fake
    torch.manual_seed(rank_seed(seed, rank))                     # from here, each process its own noise
    return student_call, fake_call


def average_gradients(params, world):
    """The hooks engine: each gradient is averaged over the processes as soon as backward has accumulated it, so
    gradient clipping and the optimiser step see the global batch's gradient on every rank. Every rank runs the
    same backwards, so the collectives line up."""
    def hook(p):
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def shard_units(net):
    """The modules FSDP2 shards one by one: the innermost blocks held in ModuleLists (DiT blocks; UNet resnets,
    transformer blocks, down- and upsamplers; the toy's residual blocks). A block holding further such blocks is
    not a unit itself; a list of plain layers (an attention's [Linear, Dropout]) holds no blocks. While a unit
    runs only its own parameters are gathered; the rest (embeddings, norms, projections) belongs to the root."""
    units = []

    def visit(module):
        for child in module.children():
            for block in (child if isinstance(child, nn.ModuleList) else ()):
                found = len(units)
                visit(block)
                if len(units) == found and any(True for _ in block.children()) and any(True for _ in
                                                                                           block.parameters()):
                    units.append(block)
            if not isinstance(child, nn.ModuleList):
                visit(child)
    visit(net)
    return units


def shard(net, mesh):
    """FSDP2 in place over `mesh`: each unit of `shard_units`, then the root (which gathers the remaining
    parameters)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise RuntimeError(f"--parallel fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}: "
                           "upgrade torch, or use --parallel ddp") from None
    for unit in shard_units(net):
        fully_shard(unit, mesh=mesh)
    fully_shard(net, mesh=mesh)


def is_sharded(net):
    return any(is_dtensor(p) for p in net.parameters())


def is_dtensor(x):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:                     # torch < 2.5: no public DTensor, and nothing here is sharded
        return False
    return isinstance(x, DTensor)


def check_in_sync(net, world):
    """Raise if the processes' copies of `net` differ (a checksum, compared at every checkpoint). A sharded
    network holds each parameter once: nothing to compare."""
    if world == 1 or is_sharded(net):
        return
    c = sum(p.detach().double().sum() for p in net.parameters())
    both = torch.stack([c, -c]).to(next(net.parameters()).device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if both[0] != c or -both[1] != c:
        raise RuntimeError("data-parallel ranks out of sync: a network's weights differ between processes")


#################################################################################
#                          Sharded states <-> checkpoint states                 #
#################################################################################

def full_state(obj, keep=True):
    """A state (nested dicts / lists of tensors, e.g. a state_dict or an optimiser's) with every DTensor shard
    gathered into the whole tensor, on the CPU, one tensor at a time (every rank must call it: the gathers are
    collectives). `keep` False (ranks other than 0): the gathered tensors are dropped. Plain tensors pass."""
    if isinstance(obj, dict):
        return {k: full_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v, keep) for v in obj)
    if is_dtensor(obj):
        whole = obj.full_tensor()
        return whole.cpu() if keep else None
    return obj


def sharded_like(full, own):
    """`full` (a whole tensor from a checkpoint) split as `own` is: a DTensor with own's mesh and placement, this
    rank keeping its own piece (cut on the CPU, no communication), or `full` itself when `own` is a plain tensor.
    FSDP2 shards dim 0 over a 1-D mesh as torch.chunk does (trailing ranks may hold empty pieces)."""
    if not is_dtensor(own):
        return full
    from torch.distributed.tensor import DTensor, Shard
    if own.device_mesh.ndim != 1 or tuple(own.placements) != (Shard(0),):
        raise ValueError(f"sharded tensor placed as {own.placements} on a {own.device_mesh.ndim}-D mesh: "
                         "parallel.py writes 1-D meshes sharded on dim 0 only")
    pieces = torch.chunk(full, own.device_mesh.size(), dim=0)
    rank = own.device_mesh.get_local_rank()
    piece = pieces[rank] if rank < len(pieces) else full[:0]
    return DTensor.from_local(piece.to(own.device, own.dtype, copy=True).contiguous(), own.device_mesh,
                              own.placements, shape=full.shape, stride=full.stride())


def load_state(net, state):
    """net.load_state_dict(state) for a checkpoint's whole tensors, sharded or not."""
    own = net.state_dict()
    net.load_state_dict({k: sharded_like(v, own[k]) if k in own else v for k, v in state.items()})


def load_optimizer_state(opt, state):
    """opt.load_state_dict(state) for a checkpoint's whole tensors: each moment tensor (exp_avg, exp_avg_sq: the
    shape of its parameter) is split as its parameter is."""
    params = [p for g in opt.param_groups for p in g["params"]]
    per_param = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        per_param[i] = {k: sharded_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                        for k, v in s.items()}
    opt.load_state_dict({**state, "state": per_param})
