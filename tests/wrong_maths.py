"""Known wrong versions of tdm.py, and whether the tests catch each one (mutation check).

    python tests/wrong_maths.py            # tests/test_tdm_maths.py and the other maths tests (minutes on 2 cores)
    python tests/wrong_maths.py --quick    # tests/test_tdm_maths.py only (about a minute)
    python tests/wrong_maths.py --only A,B --tests tests/test_tdm_maths.py,tests/test_tdm.py

For the unmutated code and then for each wrong version: copy the repository's Python files (and its pytest
configuration) to a temporary folder, apply the mutation to tdm.py there by exact string replacement (a
target string that is missing or not unique stops the script: it must never test an unmutated copy by
mistake), run pytest there, and collect the names of the failing tests. The unmutated copy must pass every
test; a mutation is caught when at least one test of tests/test_tdm_maths.py (the method tests) fails.
Exit status 1 if the unmutated copy fails or any mutation survives. Nothing is written inside the
repository (the copies, pytest's reports and bytecode live in the temporary folder).

The file name does not start with test_, so pytest does not collect it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_TESTS = "tests/test_tdm_maths.py"
# The other tests of tdm.py's maths, run alongside to show what they catch.
OTHER_MATHS_TESTS = ("tests/test_tdm.py",)
COPY_EXTENSIONS = (".py", ".ini", ".cfg", ".toml", ".txt")     # sources, pytest.ini, requirements, prompts

# name -> (what is wrong, [(exact text in tdm.py, replacement), ...])
MUTATIONS = {
    "A": ("student trained only at its last step (k = K-1)",
          [("    k = torch.randint(K, (B,), device=device)\n",
            "    k = torch.full((B,), K - 1, device=device)\n")]),
    "B": ("CFG: cond and uncond swapped after the batched call",
          [("    x0_c, x0_u = x0.chunk(2)\n", "    x0_u, x0_c = x0.chunk(2)\n")]),
    "B'": ("CFG: cond and uncond concatenated in the wrong order",
           [("_cat(cond, uncond))   # (2B, ...)", "_cat(uncond, cond))   # (2B, ...)")]),
    "B''": ("tdm_step passes uncond as the condition of the real score",
            [("cfg_denoise(teacher.denoise, x_tau, tau, cond, uncond, c.cfg)",
              "cfg_denoise(teacher.denoise, x_tau, tau, uncond, cond, c.cfg)")]),
    "C": ("importance_weight returns ones",
          [("    a, beta = transition(schedule, t_m, tau)\n    m = (",
            "    return torch.ones(z.shape[0], device=z.device)\n"
            "    a, beta = transition(schedule, t_m, tau)\n    m = (")]),
    "C'": ("tdm_step's fake loss ignores the importance weight",
           [("x0_sg, sch, tau, w_is, c.snr_clamp", "x0_sg, sch, tau, torch.ones_like(w_is), c.snr_clamp")]),
    "D": ("importance_weight returns 1/w (the inverse ratio)",
          [("        return torch.exp(log_w)\n", "        return torch.exp(-log_w)\n"),
           ("    return torch.exp(-0.5 * m.pow(2).mean(dims) + 0.5 * z.pow(2).mean(dims))\n",
            "    return torch.exp(0.5 * m.pow(2).mean(dims) - 0.5 * z.pow(2).mean(dims))\n")]),
    "D'": ("tdm_step's fake loss divides by the importance weight",
           [("x0_sg, sch, tau, w_is, c.snr_clamp", "x0_sg, sch, tau, 1 / w_is, c.snr_clamp")]),
}


def copy_repo(src, dst):
    """Copy the repository's Python sources and configuration (no .git, caches, images or run folders)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        rel = os.path.relpath(root, src)
        for f in files:
            if f.endswith(COPY_EXTENSIONS):
                os.makedirs(os.path.join(dst, rel), exist_ok=True)
                shutil.copy2(os.path.join(root, f), os.path.join(dst, rel, f))


def mutate(folder, name):
    """Apply mutation `name` to folder/tdm.py; every target string must occur exactly once."""
    path = os.path.join(folder, "tdm.py")
    with open(path) as fh:
        text = fh.read()
    for old, new in MUTATIONS[name][1]:
        n = text.count(old)
        if n != 1:
            raise SystemExit(f"wrong_maths.py: mutation {name} ({MUTATIONS[name][0]}): its target string occurs "
                             f"{n} times in tdm.py (needs exactly 1), so it cannot be applied. tdm.py has changed: "
                             f"update MUTATIONS.\n  target: {old!r}")
        text = text.replace(old, new)
    with open(path, "w") as fh:
        fh.write(text)


def failed_tests(report):
    """Names (file::test) of the failed or errored test cases in a JUnit XML report."""
    out = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/") + ".py"
            out.append(f"{path}::{case.get('name')}")
    return out


def run(name, test_files, workdir):
    """Copy, mutate (unless name is None), run pytest; -> (name, failed test names, pytest exit code, output tail)."""
    folder = os.path.join(workdir, name or "unmutated")
    copy_repo(REPO, folder)
    if name:
        mutate(folder, name)
    report = os.path.join(workdir, f"{name or 'unmutated'}.xml")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           *test_files], cwd=folder, env=env, capture_output=True, text=True)
    if not os.path.exists(report):          # pytest could not even collect (import error, bad option)
        return name, ["<no report: pytest did not run>"], proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    return name, failed_tests(report), proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def short(names, keep):
    """'test_a, test_b' for the names whose file satisfies keep(file); '-' if none."""
    return ", ".join(n.split("::", 1)[1] for n in names if keep(n.split("::", 1)[0])) or "-"


def default_tests(quick):
    others = [f for f in OTHER_MATHS_TESTS if os.path.exists(os.path.join(REPO, f))][:1]
    return [METHOD_TESTS] + ([] if quick else others)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"run {METHOD_TESTS} only")
    ap.add_argument("--tests", default="", help=f"comma-separated test files (default: {METHOD_TESTS} and the "
                    f"first of {', '.join(OTHER_MATHS_TESTS)} that exists)")
    ap.add_argument("--jobs", type=int, default=2, help="pytest runs in parallel (default 2)")
    ap.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    args = ap.parse_args(argv)
    test_files = [f for f in args.tests.split(",") if f] or default_tests(args.quick)
    if METHOD_TESTS not in test_files:
        raise SystemExit(f"--tests must include {METHOD_TESTS}: a mutation is caught when one of its tests fails")
    missing = [f for f in test_files if not os.path.exists(os.path.join(REPO, f))]
    if missing:
        raise SystemExit(f"test file(s) not found in {REPO}: {missing}")
    names = [n for n in args.only.split(",") if n] or list(MUTATIONS)
    unknown = set(names) - set(MUTATIONS)
    if unknown:
        raise SystemExit(f"unknown mutation(s) {sorted(unknown)}; known: {list(MUTATIONS)}")
    workdir = tempfile.mkdtemp(prefix="tdm_wrong_maths_")
    try:
        for name in names:                  # check every target string before spending minutes on pytest
            probe = os.path.join(workdir, "probe")
            os.makedirs(probe, exist_ok=True)
            shutil.copy2(os.path.join(REPO, "tdm.py"), probe)
            mutate(probe, name)
        print(f"running {' '.join(test_files)} on the unmutated copy ...", flush=True)
        _, base_failed, rc, tail = run(None, test_files, workdir)
        if base_failed or rc != 0:
            print(tail)
            print(f"the UNMUTATED copy fails (pytest exit {rc}): {base_failed}; fix that first")
            return 1
        print(f"unmutated: all tests pass. Running {len(names)} mutations ({args.jobs} at a time) ...", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda n: run(n, test_files, workdir), names))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    other_files = ", ".join(f for f in test_files if f != METHOD_TESTS)
    rows, survived = [], []
    for name, failed, _, _ in results:
        caught = any(n.startswith(METHOD_TESTS + "::") for n in failed)
        if not caught:
            survived.append(name)
        rows.append((name, MUTATIONS[name][0], short(failed, lambda f: f == METHOD_TESTS),
                     short(failed, lambda f: f != METHOD_TESTS) if other_files else "(not run)",
                     "PASS" if caught else "FAIL"))
    head = ("mutation", "what is wrong", f"failed in {METHOD_TESTS}", f"failed in {other_files or 'other files'}",
            "check")
    print("\n| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ncheck: PASS when at least one test of {METHOD_TESTS} fails on the mutated copy.")
    if survived:
        print(f"SURVIVED (no method test failed): {', '.join(survived)}")
        return 1
    print(f"all {len(rows)} mutations caught; the unmutated copy passes every test.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
