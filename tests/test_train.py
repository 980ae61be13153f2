"""train.py: the CLI end to end (toy and PixArt), exact resume (also of runs written in older layouts), the defaults
of each teacher, errors for bad flags, progress output in logs, (data parallel: test_parallel.py).

The toy runs use a cheaply fitted toy teacher (conftest.fast_toy_teacher); the PixArt runs a tiny random pipeline
folder (fixtures.write_tiny_pixart).
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file
import torch
from PIL import Image

import parallel
import sample
import teachers
import train
from fixtures import assert_png, to_flat_unify_run
from models import StepCountEmbedding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#################################################################################
#                          Toy runs: CLI and resume                             #
#################################################################################

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_cli_smoke(fast_toy_teacher, tmp_path, device, capsys):
    run = train.main(["--out", str(tmp_path), "--name", "smoke", "--iters", "4", "--batch", "64", "--figure-n", "2000",
                      "--eval-every", "2", "--eval-n", "500", "--final-eval-n", "500", "--save-every", "2",
                      "--device", device])
    assert ("peak GPU memory" in capsys.readouterr().out) == (device == "cuda")     # it trained where asked
    assert os.path.normpath(run) == os.path.normpath(tmp_path / "smoke")
    for f in ("student.safetensors", "student.json", "ckpt.safetensors", "ckpt.json", "metrics.jsonl",
              "metrics.json", "figure.png", "curve.png"):
        assert os.path.getsize(os.path.join(run, f)) > 0, f
    assert_png(os.path.join(run, "figure.png"))
    assert_png(os.path.join(run, "curve.png"))
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        curve = [json.loads(line) for line in fh]
    assert [r["iteration"] for r in curve] == [0, 2, 4] and all(math.isfinite(r["sw2_4"]) for r in curve)
    with open(os.path.join(run, "metrics.json")) as fh:
        rows = json.load(fh)["rows"]
    assert {"noise floor", "teacher 100", "student 1", "student 4"} <= set(rows)
    with open(os.path.join(run, "student.json")) as fh:
        meta = json.load(fh)
    assert meta["iteration"] == 4 and meta["grid"] == [899, 674, 449, 224]

    sample.main(["--student", run, "--steps", "1", "--n", "500", "--out", str(tmp_path / "s.png")])
    sample.main(["--teacher", "toy-exact", "--steps", "8", "--n", "500", "--out", str(tmp_path / "t.png")])
    assert_png(tmp_path / "s.png")
    assert_png(tmp_path / "t.png")


def test_resume_equals_uninterrupted_run(fast_toy_teacher, tmp_path):
    common = ["--out", str(tmp_path), "--batch", "32", "--eval-every", "1", "--eval-n", "200",
              "--final-eval-n", "0", "--figure-n", "0", "--save-every", "100", "--unify", "1,2,4", "--ema", "0.9",
              "--fake-reg", "0.02"]
    straight = train.main(common + ["--name", "straight", "--iters", "6"])
    parted = train.main(common + ["--name", "parted", "--iters", "3"])
    assert train.load_checkpoint(parted)[1]["iteration"] == 3
    # the same run at 3 iterations in the layout written before the step-count embedding left the network
    old = to_flat_unify_run(shutil.copytree(parted, tmp_path / "old"))
    assert {"student.step_emb.weight", "fake.step_emb.weight", "ema.step_emb.weight"} <= set(
        train.read_state_dict(os.path.join(old, "ckpt.safetensors")))
    assert json.load(open(os.path.join(old, "student.json")))["network"]["step_counts"] == [1, 2, 4]
    train.main(["--resume", parted, "--iters", "6"])                 # the run's own eval / figure settings
    train.main(["--resume", old, "--iters", "6"])
    a, meta_a = train.load_checkpoint(straight)
    for run in (parted, old):
        b, meta_b = train.load_checkpoint(run)
        assert meta_a["iteration"] == meta_b["iteration"] == 6
        for part in ("student", "fake", "ema"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (run, part, k)
    # the resumed old run samples (and its files are in today's layout now)
    _, net, _ = sample.load_run(old)
    assert isinstance(net, StepCountEmbedding) and "table.weight" in sample.read_state_dict(
        os.path.join(old, "student.safetensors"))
    sample.main(["--student", old, "--steps", "2", "--n", "300", "--out", str(tmp_path / "old.png")])
    assert_png(tmp_path / "old.png")
    # and training did change the student (so equality is not trivial)
    fresh = teachers.copy_network(teachers.load_teacher("toy", target="ring", log=None).network, (1, 2, 4))
    assert any(not torch.equal(b["student"][k], v) for k, v in fresh.state_dict().items())


def test_a_cached_toy_teacher_gives_the_same_run_as_a_fresh_fit(fast_toy_teacher, tmp_path, monkeypatch):
    """The first run fits the toy teacher (cache miss), the second loads it: both must draw the same noise and
    train the same student (building the MLP draws from the global RNG on both paths)."""
    monkeypatch.setenv("TDM_CACHE", str(tmp_path / "empty_cache"))
    common = ["--out", str(tmp_path), "--iters", "3", "--batch", "32", "--eval-every", "0", "--final-eval-n", "0",
              "--figure-n", "0"]
    fresh, cached = (train.main(common + ["--name", name]) for name in ("fresh", "cached"))
    a, b = train.load_checkpoint(fresh)[0], train.load_checkpoint(cached)[0]
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])


def test_resume_on_another_device_type_warns():
    """A checkpoint written on a GPU (it holds a CUDA generator state) resumed on the CPU: the CPU stream is
    restored, and the log says the run is not bit-exact; a CPU checkpoint on the CPU restores silently."""
    state = torch.get_rng_state()
    logged = []
    parallel.set_rng_states({"rank_rng": [{"rng": state, "cuda_rng": torch.zeros(16, dtype=torch.uint8)}]},
                         torch.device("cpu"), 0, 1, 0, 10, logged.append)
    assert len(logged) == 1 and "written on cuda, this run is on cpu" in logged[0]
    assert torch.equal(torch.get_rng_state(), state)
    parallel.set_rng_states({"rank_rng": [{"rng": state}]}, torch.device("cpu"), 0, 1, 0, 10, logged.append)
    assert len(logged) == 1


def test_resume_a_run_saved_before_newer_flags(fast_toy_teacher, tmp_path):
    """A checkpoint whose saved settings predate --importance / --figure-n / --interval resumes: the old
    --no-importance maps onto --importance off, --shared-interval onto --interval, newer flags take defaults."""
    run = train.main(["--out", str(tmp_path), "--name", "old", "--batch", "32", "--iters", "2", "--eval-every", "0",
                      "--final-eval-n", "0", "--figure-n", "0", "--importance", "off"])
    path = os.path.join(run, "ckpt.json")
    meta = json.load(open(path))
    for k in ("importance", "figure_n", "interval"):
        del meta["args"][k]
    meta["args"]["no_importance"] = True
    meta["args"]["shared_interval"] = False             # --shared-interval (store_true) before --interval
    json.dump(meta, open(path, "w"))
    tensors = os.path.join(run, "ckpt.safetensors")       # as written then: no sidecar embedded in the tensors file
    save_file(load_file(tensors), tensors)
    train.main(["--resume", run, "--iters", "3", "--figure-n", "0"])
    args = json.load(open(path))["args"]
    assert args["importance"] == "off" and "no_importance" not in args and args["figure_n"] == 0
    assert args["interval"] == "separate" and "shared_interval" not in args   # the old run's own interval kept
    with pytest.raises(ValueError, match="cannot change on resume: --batch, --lr-fake"):
        train.main(["--resume", run, "--iters", "4", "--batch", "8", "--lr-fake", "1e-3"])


def test_progress_in_a_log_is_plain_lines(fast_toy_teacher, tmp_path, capsys):
    """With stdout and stderr not terminals (a log file, CI), progress is a plain line every tenth of the run: no
    carriage-return redraws, a handful of lines for a 20-iteration run."""
    train.main(["--out", str(tmp_path), "--name", "log", "--batch", "16", "--iters", "20", "--eval-every", "0",
                "--final-eval-n", "0", "--figure-n", "0"])
    out, err = capsys.readouterr()
    assert "\r" not in out and "\r" not in err and err == ""
    lines = out.splitlines()
    assert 2 <= len(lines) <= 12, lines
    assert [line.split()[1] for line in lines if line.startswith("TDM ")] == [f"{i}/20" for i in range(2, 21, 2)]
    progress = train.Progress(7, main_proc=False)                     # other ranks print nothing
    progress.log("x")
    progress.update(7, dict(loss_fake=0.0, loss_gen=0.0, K=4))
    progress.close()
    assert capsys.readouterr() == ("", "")


#################################################################################
#                          Defaults and bad inputs                              #
#################################################################################

def test_pixart_defaults_are_the_official_recipe_and_the_toy_departs_where_documented():
    """PixArt keeps the official interval and Min-SNR-5 fake; the toy uses the shared interval and the eps-MSE fake
    (docs/toy-results.md, "Stability over long runs"); an explicit flag wins over either."""
    toy, pixart = train.parse_args([]), train.parse_args(["--teacher", "pixart"])
    assert (toy.interval, toy.snr_clamp) == ("shared", 1000.0)
    assert (pixart.interval, pixart.snr_clamp, pixart.cfg, pixart.lr_fake) == ("separate", 5.0, 4.5, 2e-5)
    official = train.parse_args(["--interval", "separate", "--snr-clamp", "5"])
    assert (official.interval, official.snr_clamp) == ("separate", 5.0)


@pytest.mark.parametrize("name", sorted(teachers.TEACHERS))
def test_defaults_per_teacher(name):
    """Every flag left unset takes the teacher's DEFAULTS; --toy-target defaults to ring for the toy teachers only."""
    args = train.parse_args(["--teacher", name])
    defaults = teachers.TEACHERS[name].DEFAULTS
    assert {k: getattr(args, k) for k in defaults} == defaults
    assert args.toy_target == ("ring" if teachers.TEACHERS[name].OUTPUT == "points" else None)
    assert args.unify_steps == () and train.parse_args(["--teacher", name, "--unify", "4,1,2"]).unify_steps == (4, 1, 2)
    given = train.parse_args(["--teacher", name, "--batch", "7", "--cfg", "2.5", "--ema", "0"])
    assert (given.batch, given.cfg, given.ema) == (7, 2.5, 0.0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no ckpt.json"):
        train.main(["--resume", str(empty), "--iters", "2"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible to torch here; pass --device cpu"):
            train.main(["--out", str(tmp_path), "--device", "cuda", "--iters", "1"])


@pytest.mark.parametrize("argv,why", [
    (["--teacher", "pixart", "--unify", "1,2,4", "--lora", "4"], "--unify needs a full fine-tune"),
    (["--teacher", "pixart", "--importance", "exact"], "--importance exact is for the toy"),
    (["--teacher", "pixart", "--toy-target", "grid"], "--toy-target is for the toy teachers, not --teacher pixart"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--figure-n", "-1"], "--figure-n and --final-eval-n must be 0 (off) or more"),
    (["--iter", "5"], "unrecognized arguments: --iter"),
    (["--lora", "4"], "--lora, --weights, --resolution, --precision"),
    (["--grad-checkpointing", "on"], "are for image teachers (e.g. --teacher pixart)"),
    (["--weights", "PixArt-XL-2-512x512"], "are for image teachers (e.g. --teacher pixart)"),
    (["--fake-updates", "0"], "--fake-updates must be at least 1"),
    (["--fake-reg", "-0.1"], "--fake-reg must be 0 (off) or more"),
    (["--snr-clamp", "0"], "--snr-clamp must be positive"),
    (["--steps", "0"], "--steps 0: the student needs 1 to 900 steps below --t-max 899"),
    (["--unify", "1,3,x"], "--unify '1,3,x': expected step counts separated by commas, e.g. 1,2,4"),
    (["--unify", "1,1"], "--unify '1,1': step counts must be distinct, each in 1..900"),
    (["--t-max", "0"], "--t-max 0: the first grid time must be a training timestep in 1..999"),
    (["--lr-ratio", "0"], "--lr-fake and --lr-ratio must be positive")])
def test_bad_flags_exit_with_one_error_line(argv, why, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--iters", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and why in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1 and "Traceback" not in err


#################################################################################
#                          PixArt end to end                                    #
#################################################################################

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


def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(setup):
    """--precision fp16 (the official mixed precision): fp16 autocast per call, a GradScaler whose state is saved
    with the checkpoint, so 1 + 1 iterations give the weights and the scaler of 2 straight ones."""
    root, folder, prompts = setup
    straight = _train(root, folder, prompts, "fp16_straight", "--iters", "2", "--precision", "fp16")
    split = _train(root, folder, prompts, "fp16_split", "--iters", "1", "--precision", "fp16")
    train.main(["--resume", split, "--iters", "2"])
    (a, _), (b, meta) = train.load_checkpoint(straight), train.load_checkpoint(split)
    assert meta["args"]["precision"] == "fp16" and a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 1
    for part in ("student", "fake"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


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


def test_1024_ms_style_folder_trains_and_samples(tmp_path, tiny_pixart, tiny_pixart_ms):
    """A 1024-MS-style folder (resolution / aspect-ratio micro-conditions, pos-embed scale 2): train (LoRA),
    resume, sample. The DiT refuses a forward without the micro-conditions, so this proves they are passed."""
    folder = tiny_pixart_ms
    run = _train(tmp_path, folder, tiny_pixart[1], "ms", "--iters", "2", "--lora", "4")
    train.main(["--resume", run, "--iters", "3"])
    teacher, _, meta = sample.load_run(run, device="cpu")
    assert teacher.network.config.use_additional_conditions and teacher.network.config.interpolation_scale == 2
    assert meta["iteration"] == 3
    out = str(tmp_path / "ms.png")
    sample.main(["--student", run, "--steps", "4", "--out", out, "--prompts", "a cat"])
    assert Image.open(out).size == (64, 64)


def test_unify_student(setup, capsys):
    """TDM-unify on the DiT: one full fine-tuned student for K in {1, 2, 4}; previews one row per K; the run
    samples at each of them; a K it was not trained for is refused."""
    root, folder, prompts = setup
    run = _train(root, folder, prompts, "unify", "--iters", "2", "--unify", "1,2,4")
    assert Image.open(os.path.join(run, "previews", "000002.png")).size == (4 * 64 + 6, 3 * 64 + 4)
    _, net, meta = sample.load_run(run, device="cpu")
    assert meta["unify"] == [1, 2, 4] and net.step_counts == [1, 2, 4]
    assert net.table.weight.abs().sum() > 0                               # it trained
    for K in ("1", "4"):
        out = str(root / f"unify{K}.png")
        sample.main(["--student", run, "--steps", K, "--out", out, "--prompts", "a cat"])
        assert Image.open(out).size == (64, 64)
    with pytest.raises(SystemExit):
        sample.main(["--student", run, "--steps", "3", "--out", str(root / "no.png"), "--prompts", "a cat"])
    assert "--steps 3: this TDM-unify student was trained for K in [1, 2, 4]" in capsys.readouterr().err


def test_grad_checkpointing_flag_reaches_student_and_fake(setup, monkeypatch):
    """--grad-checkpointing on applies on CPU too (auto = GPU only): the copies inherit it from the teacher's DiT."""
    root, folder, prompts = setup
    seen = {}
    build = train.build_student_and_fake

    def spy(teacher, args):
        student, fake = build(teacher, args)
        seen["flags"] = (student.gradient_checkpointing, fake.gradient_checkpointing)
        return student, fake
    monkeypatch.setattr(train, "build_student_and_fake", spy)
    _train(root, folder, prompts, "ckpt_on", "--iters", "1", "--grad-checkpointing", "on", "--preview-every", "0")
    assert seen["flags"] == (True, True)
    _train(root, folder, prompts, "ckpt_auto", "--iters", "1", "--preview-every", "0")
    assert seen["flags"] == (False, False)


@pytest.mark.parametrize("script,argv,words", [
    ("train.py", ["--steps", "0"], "--steps 0: the student needs 1 to 900 steps"),
    ("train.py", ["--teacher", "pixart", "--weights", "no/such/folder"], "'no/such/folder' does not exist"),
    ("sample.py", ["--student", "no/such/run"], "has no student.safetensors + student.json"),
    ("eval.py", ["--student-steps", "1,x"], "--student-steps '1,x': expected step counts")])
def test_command_line_errors_are_one_line_without_traceback(script, argv, words, tmp_path):
    """As a user sees them: exit status 1 or 2, one line on stderr starting with the script's `error:`, no traceback."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "TDM_TRACEBACK": ""})
    lines = r.stderr.strip().splitlines()
    assert r.returncode in (1, 2) and len(lines) == 1 and "error: " in lines[0] and words in lines[0], r.stderr


#################################################################################
#                          Reliability                                          #
#################################################################################

def test_a_kill_between_the_checkpoint_files_leaves_a_resumable_run(fast_toy_teacher, tmp_path, monkeypatch):
    """ckpt.safetensors carries its sidecar and is replaced in one rename: a process killed after it (before
    ckpt.json) or before it leaves a checkpoint that resumes to exactly the uninterrupted run's weights."""
    common = ["--out", str(tmp_path), "--batch", "32", "--eval-every", "0", "--final-eval-n", "0", "--figure-n", "0",
              "--save-every", "2"]
    straight = train.main([*common, "--name", "straight", "--iters", "4"])
    run = train.main([*common, "--name", "killed", "--iters", "2"])
    real_write = train._write_json

    def killed(obj, path):                                  # "SIGKILL" right after the tensors file of iteration 4
        if path.endswith("ckpt.json") and obj["iteration"] == 4:
            raise KeyboardInterrupt
        real_write(obj, path)
    monkeypatch.setattr(train, "_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--resume", run, "--iters", "4"])
    monkeypatch.undo()
    assert json.load(open(os.path.join(run, "ckpt.json")))["iteration"] == 2     # the json lags behind ...
    state, meta = train.load_checkpoint(run)
    assert meta["iteration"] == 4 == int(state["iteration"])                   # ... resume reads the whole new one
    (a, _) = train.load_checkpoint(straight)
    assert all(torch.equal(a["student"][k], state["student"][k]) for k in a["student"])
    train.main(["--resume", run, "--iters", "5"])                               # and continues from it
    assert train.load_checkpoint(run)[1]["iteration"] == 5


def test_a_nan_loss_stops_the_run_keeping_the_last_good_checkpoint(fast_toy_teacher, tmp_path, monkeypatch):
    """A NaN in a loss at iteration 3: the run stops with one line naming the iteration, the loss and the last
    checkpoint (iteration 2), which stays as it was and resumes."""
    real_step = train.tdm.tdm_step
    calls = []

    def poisoned(*args, **kw):
        logs = real_step(*args, **kw)
        calls.append(1)
        return {**logs, "loss_fake": float("nan")} if len(calls) == 3 else logs
    monkeypatch.setattr(train.tdm, "tdm_step", poisoned)
    common = ["--out", str(tmp_path), "--name", "nan", "--batch", "32", "--eval-every", "0", "--final-eval-n", "0",
              "--figure-n", "0", "--save-every", "2"]
    with pytest.raises(FloatingPointError, match=r"iteration 3: loss_fake = nan; the run stopped without saving: the "
                                                 r"last good checkpoint is iteration 2"):
        train.main([*common, "--iters", "6"])
    run = os.path.join(tmp_path, "nan")
    assert train.load_checkpoint(run)[1]["iteration"] == 2
    monkeypatch.undo()
    r = subprocess.run([sys.executable, "-c", "import sys, sample, train; sys.argv[0] = 'train.py'; "
                        "train.tdm.tdm_step = lambda *a, **k: dict(loss_gen=float('inf'), "
                        "loss_fake=0.0, grad_norm=1.0, K=4); sample.command_line(train.main)",
                        "--resume", run, "--iters", "6"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr
    assert "iteration 3: loss_gen = inf" in r.stderr and "iteration 2" in r.stderr
