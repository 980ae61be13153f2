"""Data parallel under torchrun, on CPU with the gloo backend: gradient averaging, exact resume, LoRA on PixArt."""
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hook_worker(rank, world, store_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)                                       # the same initial weights on both ranks
    train.average_gradients(list(net.parameters()), world)
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
    mp.spawn(_hook_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)


def _torchrun(*args, check=True):
    """train.py under torchrun with 2 processes on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 or not check, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_torchrun_toy_resume_equals_uninterrupted(fast_toy_teacher, tmp_path):
    common = ["--out", str(tmp_path), "--batch", "64", "--eval-every", "0", "--final-eval-n", "0", "--figure-n", "0"]
    _torchrun(*common, "--name", "straight", "--iters", "6")
    _torchrun(*common, "--name", "split", "--iters", "3")
    r = _torchrun("--resume", str(tmp_path / "split"), "--iters", "6")
    assert "2 processes, 32 samples each" in r.stdout
    a, b = (train.read_state_dict(os.path.join(tmp_path, name, "ckpt.safetensors")) for name in ("straight", "split"))
    assert a.keys() == b.keys()
    for k in a:                                                       # weights, AdamW states and RNG streams
        assert torch.equal(a[k], b[k]), k
    state, _ = train.load_checkpoint(tmp_path / "straight")
    assert len(state["rank_rng"]) == 2                                # both ranks' RNG streams are saved
    # both ranks drew their own noise: their saved RNG states differ
    assert not torch.equal(state["rank_rng"][0]["rng"], state["rank_rng"][1]["rng"])


def test_torchrun_pixart_lora(tmp_path, tiny_pixart):
    folder, prompts = tiny_pixart
    _torchrun("--teacher", "pixart", "--weights", folder, "--prompts", prompts, "--out", str(tmp_path),
              "--name", "ddp", "--batch", "4", "--iters", "2", "--lora", "4", "--preview-every", "2")
    state, meta = train.load_checkpoint(tmp_path / "ddp")
    assert meta["iteration"] == 2 and os.path.exists(tmp_path / "ddp" / "previews" / "000002.png")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in state["student"].items())


def test_batch_must_divide_by_the_processes(tmp_path):
    r = _torchrun("--out", str(tmp_path), "--batch", "5", "--iters", "1", check=False)
    assert r.returncode != 0 and "must divide by the 2 processes" in r.stderr
