"""benchmark.py: the forward counts of both call patterns and the computed memory table (no timing asserted)."""
import argparse

import pytest
import torch

import benchmark
from models import trainable_lora_views
from pixart import PixArtConfig, dit_from_config

TINY = PixArtConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, sample_size=8,
                    caption_channels=16)


def test_state_gib_counts_weights_grads_and_adam_moments():
    frozen, trained = torch.nn.Linear(10, 10).to(torch.bfloat16).requires_grad_(False), torch.nn.Linear(10, 10)
    n = 110                                                           # 10 x 10 weight + 10 bias
    expected = n * 2 + n * 4 + n * (4 + 8)                            # bf16 frozen; fp32 weight + grad + 2 moments
    assert benchmark.state_gib([frozen, trained, trained]) * 2 ** 30 == expected   # shared modules counted once


def test_memory_table_full_vs_lora():
    m = benchmark.memory_table(TINY, lora=4, dtype=torch.bfloat16)
    n = sum(p.numel() for p in dit_from_config(TINY).parameters())
    assert m["params"] == n
    assert m["full"] * 2 ** 30 == n * 4 + 2 * n * (4 + 4 + 8)         # teacher fp32; student, fake fp32 + grad + Adam
    views = trainable_lora_views(dit_from_config(TINY), 4)
    a = sum(p.numel() for v in views for p in v.adapter)
    assert m["lora"] * 2 ** 30 == n * 2 + a * (4 + 4 + 8)


def test_memory_table_of_the_sdxl_unet_at_real_size():
    """On the meta device: 2,567,463,684 parameters; full = fp32 teacher + (weights, grad, 2 moments) x 2 copies."""
    build, _, full = benchmark.NETWORKS["sdxl"]
    m = benchmark.memory_table(full(1024), lora=64, dtype=torch.bfloat16, build=build)
    assert m["params"] == 2_567_463_684 and m["full"] * 2 ** 30 == m["params"] * (4 + 2 * 16)
    assert m["params"] * 2 < m["lora"] * 2 ** 30 < 0.2 * m["full"] * 2 ** 30   # the bf16 base, plus the adapters


@pytest.mark.parametrize("name", ["pixart", "sd15", "sdxl"])
def test_forward_rows_ours_vs_official(name):
    """Official: 4 (rollout) + 3 (fake phase: student, unused teacher, fake) + 4 (student, teacher cond and
    uncond, fake) = 11 rows per sample, exactly. Ours: E[k] = 1.5 rollout rows + 5 = 6.5, k ~ U{0..3}; for the
    DiT and both UNet layouts (their own condition layouts)."""
    args = argparse.Namespace(batch=8, iters=4, warmup=0, checkpointing=False)
    cpu, config = torch.device("cpu"), TINY if name == "pixart" else benchmark.NETWORKS[name][1]
    official = benchmark.measure(benchmark.official_step, args, config, cpu, 0, torch.float32, name)
    ours = benchmark.measure(benchmark.tdm.tdm_step, args, config, cpu, 0, torch.float32, name)
    assert official["rows"] == 11.0 and official["calls"] == 11.0
    assert ours["calls"] <= 3 + 4        # rollout (at most K - 1 calls) + student + one batched teacher + 2 fake
    se = (15 / 12) ** 0.5 / (args.batch * args.iters) ** 0.5           # std of U{0..3} / sqrt(draws)
    assert ours["rows"] == pytest.approx(6.5, abs=4 * se)
