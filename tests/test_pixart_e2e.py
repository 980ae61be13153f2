"""End to end on a tiny random PixArt folder in the real diffusers layout: train (full and LoRA), resume, sample."""
import json
import os

import pytest
import torch
from PIL import Image

import sample
import train
from pixart_fixture import write_tiny_pixart

@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pixart):
    return (tmp_path_factory.mktemp("pixart_e2e"), *tiny_pixart)


def _train(root, folder, prompts, name, *extra):
    return train.main(["--teacher", "pixart", "--weights", folder, "--prompts", prompts, "--out", str(root),
                       "--name", name, "--batch", "2", "--preview-every", "2", "--save-every", "2", *extra])


@pytest.mark.parametrize("lora", [0, 4])
def test_train_resume_sample(setup, lora):
    root, folder, prompts = setup
    straight = _train(root, folder, prompts, f"straight{lora}", "--iters", "4", "--lora", str(lora))
    for f in ("student.safetensors", "student.json", "ckpt.safetensors", "ckpt.json", "previews/000004.png"):
        assert os.path.exists(os.path.join(straight, f)), f
    meta = json.load(open(os.path.join(straight, "student.json")))
    assert meta["cfg"] == 4.5 and meta["t_max"] == 899 and meta["lora"] == lora and meta["grid"] == [899, 674, 449, 224]
    # resume: 2 iterations, then continue to 4 -> the same weights as 4 straight iterations
    split = _train(root, folder, prompts, f"split{lora}", "--iters", "2", "--lora", str(lora))
    train.main(["--resume", split, "--iters", "4"])
    a = sample.read_state_dict(os.path.join(straight, "ckpt.safetensors"))
    b = sample.read_state_dict(os.path.join(split, "ckpt.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith(("student.", "fake.")):
            assert torch.equal(a[k], b[k]), k
    # the student actually trained: its weights moved away from the teacher's
    teacher, net, _ = sample.load_run(straight, device="cpu")
    moved = sum((v.float() - teacher.network.state_dict()[k].float()).abs().sum().item()
                for k, v in net.state_dict().items() if k in teacher.network.state_dict()) if not lora else \
        sum(v.abs().sum().item() for k, v in net.state_dict().items() if "lora_B" in k)
    assert moved > 0
    out = str(root / f"student{lora}.png")
    sample.main(["--student", straight, "--steps", "4", "--out", out, "--prompts", "a cat", "a dog"])
    assert Image.open(out).size == (2 * 64 + 2, 64)
    # fixed seeds give identical images
    out2 = str(root / f"student{lora}_again.png")
    sample.main(["--student", straight, "--steps", "4", "--out", out2, "--prompts", "a cat", "a dog"])
    assert Image.open(out).tobytes() == Image.open(out2).tobytes()


@pytest.mark.parametrize("solver", ["ddim", "dpm"])
def test_sample_teacher(setup, solver):
    root, folder, _ = setup
    out = str(root / f"teacher_{solver}.png")
    sample.main(["--teacher", "pixart", "--weights", folder, "--steps", "3", "--solver", solver, "--out", out,
                 "--prompts", "a cat"])
    assert Image.open(out).size == (64, 64)


def test_missing_weights_flag(setup):
    root, _, prompts = setup
    with pytest.raises(ValueError, match="--weights"):
        train.main(["--teacher", "pixart", "--prompts", prompts, "--out", str(root), "--iters", "1"])


def test_lora_bf16_base_with_few_prompts(setup):
    """train.py's GPU layout on CPU: bf16 base, fp32 adapters; previews run outside autocast; 2 prompts < 4
    preview slots; then the student loads and samples from its run folder."""
    root, folder, _ = setup
    two = root / "two_prompts.txt"
    two.write_text("a red fox in the snow\na lighthouse at dusk\n")
    run = _train(root, folder, str(two), "bf16lora", "--iters", "2", "--lora", "4", "--precision", "bf16")
    assert Image.open(os.path.join(run, "previews", "000002.png")).size == (2 * 64 + 2, 2 * 64 + 2)
    _, net, _ = sample.load_run(run, device="cpu")
    assert all(p.dtype == torch.float32 for p in net.parameters())          # the adapter as trained
    out = str(root / "bf16lora.png")
    sample.main(["--student", run, "--steps", "2", "--out", out, "--prompts", "a cat"])
    assert Image.open(out).size == (64, 64)


def test_1024_ms_style_folder_trains_and_samples(tmp_path, tiny_pixart):
    """A 1024-MS-style folder (resolution / aspect-ratio micro-conditions, pos-embed scale 2): train (LoRA),
    resume, sample. The DiT refuses a forward without the micro-conditions, so this proves they are passed."""
    folder = write_tiny_pixart(str(tmp_path / "PixArt-tiny-ms"), ms=True)
    run = _train(tmp_path, folder, tiny_pixart[1], "ms", "--iters", "2", "--lora", "4")
    train.main(["--resume", run, "--iters", "3"])
    teacher, _, meta = sample.load_run(run, device="cpu")
    assert teacher.micro_conditions and teacher.network.config.interpolation_scale == 2 and meta["iteration"] == 3
    out = str(tmp_path / "ms.png")
    sample.main(["--student", run, "--steps", "4", "--out", out, "--prompts", "a cat"])
    assert Image.open(out).size == (64, 64)


def test_unify_student(setup):
    """TDM-unify on the DiT: one full fine-tuned student for K in {1, 2, 4}; previews one row per K; the run
    samples at each of them; a K it was not trained for is refused."""
    root, folder, prompts = setup
    run = _train(root, folder, prompts, "unify", "--iters", "2", "--unify", "1,2,4")
    assert Image.open(os.path.join(run, "previews", "000002.png")).size == (4 * 64 + 6, 3 * 64 + 4)
    _, net, meta = sample.load_run(run, device="cpu")
    assert meta["unify"] == [1, 2, 4] and net.step_counts == [1, 2, 4]
    assert net.step_emb.weight.abs().sum() > 0                            # it trained
    for K in ("1", "4"):
        out = str(root / f"unify{K}.png")
        sample.main(["--student", run, "--steps", K, "--out", out, "--prompts", "a cat"])
        assert Image.open(out).size == (64, 64)
    with pytest.raises(ValueError, match="not supported"):
        sample.main(["--student", run, "--steps", "3", "--out", str(root / "no.png"), "--prompts", "a cat"])


def test_grad_checkpointing_flag_reaches_student_and_fake(setup, monkeypatch):
    """--grad-checkpointing on applies on CPU too (auto = GPU only): the copies inherit it from the teacher's DiT."""
    root, folder, prompts = setup
    seen = {}
    build = train.build_student_and_fake

    def spy(teacher, args, unify):
        student, fake = build(teacher, args, unify)
        seen["flags"] = (student.gradient_checkpointing, fake.gradient_checkpointing)
        return student, fake
    monkeypatch.setattr(train, "build_student_and_fake", spy)
    _train(root, folder, prompts, "ckpt_on", "--iters", "1", "--grad-checkpointing", "on", "--preview-every", "0")
    assert seen["flags"] == (True, True)
    _train(root, folder, prompts, "ckpt_auto", "--iters", "1", "--preview-every", "0")
    assert seen["flags"] == (False, False)
