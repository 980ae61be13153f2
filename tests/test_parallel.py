"""parallel.py: data parallel on two CPU processes (gloo). DDP, FSDP2 and the all-reduce hooks give the weights of
one process at the same global batch; FSDP2 checkpoint states round-trip; train.py under torchrun resumes exactly
in every mode, DDP equals the hooks bit for bit, FSDP2 equals DDP to the rounding of its sharded gradient norm.

All of this runs on the CPU: FSDP2 (fully_shard) on gloo shards, gathers and reduce-scatters as it does on NCCL,
so only the GPU kernels and the speed are left for a GPU.
"""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
from pixart import load_pixart
import tdm
import train
from models import LoRAView, StepCountEmbedding, ToyMLP, add_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, STEPS = 8, 3                     # global batch, optimiser steps


#################################################################################
#                          The engines, in forked workers                       #
#################################################################################

def _nets(lora):
    """(student, fake, frozen teacher network): two TDM-unify copies of a toy MLP, or two LoRA views
    on one frozen base; the same weights in every process (seeded)."""
    torch.manual_seed(0)
    base = ToyMLP(width=32, depth=2)
    if lora:
        add_lora(base, 4, targets=("fc1", "fc2"), dtype=torch.float32)
        student, fake = LoRAView(base, "student"), LoRAView(base, "fake")
        for v in (student, fake):                          # B starts at zero: give the adapters a non-zero start
            v.adapter.requires_grad_(True)
            torch.nn.init.normal_(v.adapter[1], std=0.1)
    else:
        student, fake = (StepCountEmbedding(ToyMLP(width=32, depth=2), (1, 4)) for _ in range(2))
        for net in (student, fake):
            net.net.load_state_dict(base.state_dict())
            torch.nn.init.normal_(net.table.weight, std=0.1)
    return student, fake, base


def _adamw(*nets):
    return [torch.optim.AdamW(n.parameters(), lr=1e-3, weight_decay=0.01) for n in nets]


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 2, generator=g), torch.randint(0, 2, (B,), generator=g), torch.randn(B, 2, generator=g)


def _train(student, fake, opts, rows, lora):
    """STEPS iterations of TDM's two updates on fixed data rows (a deterministic stand-in for tdm_step: the same
    losses, tdm._update with the student's grad-norm clip, both networks' backward and AdamW)."""
    x, y, r = (v[rows] for v in _data())
    t = torch.full((len(x),), 500)
    kw = {} if lora else {"step_count": torch.full((len(x),), 4)}
    for _ in range(STEPS):
        with torch.no_grad():
            f_x0 = fake(x, t, y, **kw)
        x0_hat = student(x, t, y, **kw)
        tdm._update(opts[0], tdm.generator_loss(x0_hat, r, f_x0), max_norm=0.01)    # the clip binds
        loss_fake = (fake(x, t, y, **kw) - x0_hat.detach()).pow(2).mean()
        tdm._update(opts[1], loss_fake, max_norm=None, norm=False)


def _state(student, fake, opts, keep=True):
    return parallel.full_state(dict(student=student.state_dict(), fake=fake.state_dict(),
                                    opt_student=opts[0].state_dict(), opt_fake=opts[1].state_dict()), keep)


def _worker(rank, world, store, mode, lora, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    student, fake, base = _nets(lora)
    calls = parallel.parallelise(student, fake, SimpleNamespace(network=base), mode, world, rank, seed=0)
    opts = _adamw(student, fake)                                               # after sharding
    per_rank = B // world
    _train(*calls, opts, slice(rank * per_rank, (rank + 1) * per_rank), lora)   # each rank: its half of the batch
    state = _state(student, fake, opts, keep=rank == 0)
    if mode == "fsdp":
        # the checkpoint's whole tensors, loaded into freshly sharded networks and optimisers, give the same state
        s2, f2, base2 = _nets(lora)
        parallel.parallelise(s2, f2, SimpleNamespace(network=base2), mode, world, rank, seed=0)
        o2 = _adamw(s2, f2)
        full = _state(student, fake, opts)                                     # every rank: the whole tensors
        for net, key in ((s2, "student"), (f2, "fake")):
            parallel.load_state(net, full[key])
        for o, key in ((o2[0], "opt_student"), (o2[1], "opt_fake")):
            parallel.load_optimizer_state(o, full[key])
        again = _state(s2, f2, o2, keep=rank == 0)
        if rank == 0:
            state["round_trip"] = again
        assert all(parallel.is_dtensor(p) for p in s2.parameters())
        assert all(parallel.is_dtensor(v) for o in o2 for st in o.state.values() for k, v in st.items() if k != "step")
        assert all(parallel.is_dtensor(p) for p in base.parameters())            # the teacher is sharded too
    if rank == 0:
        torch.save(state, out)
    dist.destroy_process_group()


def _flat(state, prefix=""):
    """{path: tensor} of a nested state (optimiser param_groups dropped: they hold no tensors that change)."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else []
    return {k: v for key, sub in items if key != "param_groups" for k, v in _flat(sub, f"{prefix}/{key}").items()}


@pytest.mark.parametrize("mode,lora", [("ddp", False), ("ddp", True), ("hooks", False), ("fsdp", False)])
def test_two_processes_equal_one_at_the_same_global_batch(mode, lora, tmp_path):
    """Both halves' mean gradients, averaged, are the whole batch's mean gradient: after 3 clipped AdamW steps the
    weights and moments of 2 processes equal one process's up to float32 rounding of the gradient sums. AdamW
    moves a weight by about lr (1e-3) per step whatever the gradient's size, so where the two halves' gradients
    nearly cancel, the rounding of their sum can shift an update by a fraction of lr: observed 2.4e-6 (0.1% of
    the 3e-3 travel). 5e-5 leaves 20x room and is 100x below what a rank training on its own half gives (5.6e-3
    here, the all-reduce removed)."""
    out = tmp_path / "state.pt"
    # spawned, not forked: a child forked from this process (which has run torch's thread pools) can hang
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), mode, lora, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(out)
    student, fake, _ = _nets(lora)
    opts = _adamw(student, fake)
    _train(student, fake, opts, slice(0, B), lora)                             # one process, the whole batch
    want = _flat(_state(student, fake, opts))
    for name, state in [("trained", got)] + ([("round trip", got["round_trip"])] if mode == "fsdp" else []):
        flat = _flat({k: v for k, v in state.items() if k != "round_trip"})
        assert flat.keys() == want.keys(), name
        worst = max((flat[k].double() - want[k].double()).abs().max().item() for k in want)
        assert worst < 5e-5, (name, worst)
    moved = max((a - b).abs().max().item() for a, b in zip(student.state_dict().values(), _nets(lora)[0].state_dict()
                                                             .values()))
    assert moved > 1e-4                                                        # the test has something to compare


def _hook_worker(rank, world, store_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)                                       # the same initial weights on both ranks
    parallel.average_gradients(list(net.parameters()), world)
    data = [torch.randn(5, 3, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    net(data[rank]).square().sum().backward()                         # each rank: its own data
    grads = []                                                        # the same, recomputed for every rank's data
    for x in data:
        ref = torch.nn.Linear(3, 2)
        ref.load_state_dict(net.state_dict())
        ref(x).square().sum().backward()
        grads.append([p.grad for p in ref.parameters()])
    for p, *gs in zip(net.parameters(), *grads):
        assert torch.allclose(p.grad, sum(gs) / world, atol=1e-6), (rank, p.grad, gs)
    dist.destroy_process_group()


def test_average_gradients_gives_every_rank_the_mean_gradient(tmp_path):
    mp.start_processes(_hook_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method="spawn")


def test_shard_units_are_the_innermost_blocks():
    """At real size (meta device): PixArt-XL-2's 28 DiT blocks; SDXL's 70 transformer blocks, 17 resnets and 4
    down/upsamplers, leaving 1.2% of its 2.57 B parameters to the root (gathered for the whole forward)."""
    from pixart import dit_from_config, pixart_xl_2_512_config
    from unet import sdxl_base_unet_config, unet_from_config
    net = ToyMLP(width=8, depth=3)
    assert parallel.shard_units(net) == list(net.blocks)
    with torch.device("meta"):
        dit, sdxl = dit_from_config(pixart_xl_2_512_config()), unet_from_config(sdxl_base_unet_config())
    assert parallel.shard_units(dit) == list(dit.transformer_blocks)
    units = parallel.shard_units(sdxl)
    kinds = [type(u).__name__ for u in units]
    assert {k: kinds.count(k) for k in set(kinds)} == {"BasicTransformerBlock": 70, "ResnetBlock2D": 17,
                                                        "Downsample2D": 2, "Upsample2D": 2}
    in_units = [id(p) for u in units for p in u.parameters()]
    assert len(in_units) == len(set(in_units))                                 # no parameter in two units
    total = sum(p.numel() for p in sdxl.parameters())
    root = total - sum(p.numel() for u in units for p in u.parameters())
    assert 0 < root < 0.02 * total


#################################################################################
#                          train.py under torchrun                              #
#################################################################################

def _torchrun(*args, check=True):
    """train.py under torchrun with 2 processes on CPU (gloo) -> its CompletedProcess. Launches run one at a time:
    two --standalone rendezvous started side by side can race for the same free port."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "train.py"), *args], cwd=ROOT, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0 or not check, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _ckpt(path):
    return train.read_state_dict(os.path.join(path, "ckpt.safetensors"))


def test_torchrun_toy_every_mode_and_exact_resume(fast_toy_teacher, tmp_path):
    """DDP and the hooks average the same gradients (a/2 + b/2 = (a + b)/2 exactly in floats): equal bit for bit.
    FSDP2 computes the clipped norm from per-shard sums: equal to DDP to a few float32 ulps. A run stopped at
    iteration 3 and resumed equals the uninterrupted one bit for bit, under DDP and under FSDP2: weights, AdamW
    moments, the EMA and both ranks' RNG streams."""
    common = ["--out", str(tmp_path), "--batch", "64", "--eval-every", "0", "--final-eval-n", "0", "--figure-n", "0"]
    for mode in ("ddp", "hooks", "fsdp"):
        _torchrun(*common, "--name", mode, "--iters", "6", "--parallel", mode)
    for mode in ("ddp", "fsdp"):
        _torchrun(*common, "--name", f"split-{mode}", "--iters", "3", "--parallel", mode)
    r = _torchrun("--resume", str(tmp_path / "split-fsdp"), "--iters", "6")                 # the run's own engine
    assert "2 processes, 32 samples each, fsdp" in r.stdout
    r = _torchrun("--resume", str(tmp_path / "split-ddp"), "--iters", "6")                  # ddp: the default
    assert "2 processes, 32 samples each, ddp" in r.stdout
    ddp, hooks, fsdp, split_ddp, split_fsdp = (_ckpt(tmp_path / n) for n in ("ddp", "hooks", "fsdp", "split-ddp",
                                                                             "split-fsdp"))
    assert ddp.keys() == hooks.keys() == fsdp.keys() == split_ddp.keys() == split_fsdp.keys()
    for k in ddp:
        assert torch.equal(ddp[k], hooks[k]), k
        assert torch.equal(ddp[k], split_ddp[k]), k
        assert torch.equal(fsdp[k], split_fsdp[k]), k
        if ddp[k].is_floating_point():
            assert torch.allclose(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6), k
    state, _ = train.load_checkpoint(tmp_path / "ddp")
    assert not torch.equal(state["rank_rng"][0]["rng"], state["rank_rng"][1]["rng"])   # per-rank noise streams


def test_torchrun_pixart(tmp_path, tiny_pixart):
    """LoRA under DDP and a full fine-tune under FSDP2 (teacher replicated), previews drawn by every rank."""
    folder, prompts = tiny_pixart
    common = ["--teacher", "pixart", "--weights", folder, "--prompts", prompts, "--out", str(tmp_path), "--batch",
              "4", "--iters", "2", "--preview-every", "2"]
    _torchrun(*common, "--name", "ddp", "--lora", "4")
    _torchrun(*common, "--name", "fsdp", "--parallel", "fsdp", "--fsdp-teacher", "replicate")
    for name, trained in (("ddp", "lora_B"), ("fsdp", "blocks.0.attn1.to_q.weight")):
        state, meta = train.load_checkpoint(tmp_path / name)
        assert meta["iteration"] == 2 and os.path.exists(tmp_path / name / "previews" / "000002.png")
        assert os.path.exists(tmp_path / name / "export" / "tdm_student.json")
        assert any(trained in k for k in state["student"])
    full, _ = train.load_checkpoint(tmp_path / "fsdp")                           # whole tensors, not shards
    net = load_pixart(os.path.join(folder, "transformer"))
    assert {k: v.shape for k, v in full["student"].items()} == {k: v.shape for k, v in net.state_dict().items()}
    moments = [full["opt_student"]["state"][i]["exp_avg_sq"].shape for i in range(len(list(net.parameters())))]
    assert moments == [p.shape for p in net.parameters()]


def test_batch_must_divide_by_the_processes(tmp_path):
    r = _torchrun("--out", str(tmp_path), "--batch", "5", "--iters", "1", check=False)
    assert r.returncode != 0 and "must divide by the 2 processes" in r.stderr


@pytest.mark.parametrize("argv,words", [
    (["--parallel", "fsdp"], "is for runs under torchrun with 2 or more processes"),
    (["--teacher", "pixart", "--weights", "x", "--lora", "4", "--parallel", "fsdp"], "use --parallel ddp"),
    (["--teacher", "pixart", "--weights", "x", "--precision", "fp16", "--parallel", "fsdp"], "use --precision bf16"),
    (["--fsdp-teacher", "shard"], "--fsdp-teacher is for --parallel fsdp")])
def test_parallel_flag_errors(argv, words, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--iters", "1"], cwd=tmp_path,
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2) and len(lines) == 1 and words in lines[0], r.stderr


def test_resume_refuses_fsdp_for_a_unify_run(fast_toy_teacher, tmp_path):
    run = train.main(["--out", str(tmp_path), "--name", "unify", "--unify", "1,2", "--iters", "1", "--batch", "8",
                      "--eval-every", "0", "--final-eval-n", "0", "--figure-n", "0"])
    with pytest.raises(ValueError, match="--unify with --parallel fsdp"):
        train.main(["--resume", run, "--parallel", "fsdp", "--iters", "2"])
