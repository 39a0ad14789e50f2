"""Run hostile and damaged inputs through the ``moec`` CLI of a checkout and classify each outcome.

    python benchmarks/hostile_sweep.py CHECKOUT OUT.json [--only CATEGORY]

Every case runs ``python -m moec.cli.main ...`` in a subprocess with ``PYTHONPATH=CHECKOUT``, so the
same script measures an old checkout (``git archive <commit> | tar -x -C DIR``) and the
current one. Outcomes: ``clean`` (refused in one line without a traceback, or succeeded where
success is right), ``traceback``, ``silent`` (exit 0 where it should have refused), ``hang``
(killed at the timeout). ``lost`` marks cases where files written earlier (checkpoints,
metrics rows) were gone or damaged afterwards. The full-disk cases mount a size-limited
tmpfs, so they need root; elsewhere they are reported as ``n/a``. The ``import`` category
writes tiny random HF Mixtral directories with transformers (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = """version: 1
name: {name}
model:
  d_model: 32
  max_seq_len: 64
  inputs: {{kind: tokens, vocab: 256}}
  blocks:
    - repeat: 2
      layers:
        - kind: attention
          heads: 2
        - kind: moe
          experts: 4
          top_k: 2
          expert: {{hidden: 32, activation: swiglu}}
  head: {{kind: lm}}
schedule:
  compile: {{enabled: false}}
  deterministic: true
train:
  seed: 0
  steps: {steps}
  batch: 8
  seq_len: 32
  optimizer: {{lr: 3.0e-3}}
  lr_schedule: {{warmup_steps: 2}}
  data: {{kind: text, files: ["{files}"]}}
  checkpoint: {{every: {every}, keep_last: 2{dir}}}
  eval: {{every: 2, batches: {eval_batches}}}
"""


def quick(name="quick", steps=4, files="stdlib:json/*.py", dir_="", eval_batches=2, every=2) -> str:
    return QUICK.format(name=name, steps=steps, files=files, dir=dir_, eval_batches=eval_batches, every=every)


class Sweep:
    def __init__(self, checkout: Path, work: Path):
        self.checkout, self.work, self.results = checkout, work, []
        self.env = dict(os.environ, PYTHONPATH=str(checkout), COLUMNS="200")

    def moec(self, *args, timeout=120, env=None, limit_memory=None, cwd=None):
        def preexec():
            if limit_memory:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))
        cmd = [sys.executable, "-m", "moec.cli.main", *map(str, args)]
        try:
            done = subprocess.run(cmd, cwd=cwd or self.checkout, env=env or self.env, capture_output=True, text=True,
                                  timeout=timeout, preexec_fn=preexec)
            return done.returncode, done.stdout, done.stderr
        except subprocess.TimeoutExpired as err:
            return None, err.stdout or "", err.stderr or ""

    def record(self, category, case, expect, rc, out, err, lost=False, note=""):
        err = err if isinstance(err, str) else (err or b"").decode(errors="replace")
        if rc is None:
            outcome = "hang"
        elif "Traceback" in err or "Traceback" in out:
            outcome = "traceback"
        elif expect == "refuse" and rc == 0:
            outcome = "silent"
        elif expect == "refuse" or (expect == "succeed" and rc == 0) or (isinstance(expect, int) and rc == expect):
            outcome = "clean"
        else:
            outcome = "failed"  # a clean message, but it refused what should work (or exited with the wrong code)
        last = [line for line in err.strip().splitlines() if line.strip()]
        self.results.append({"category": category, "case": case, "expect": expect, "rc": rc, "outcome": outcome, "lost": lost,
                             "message": last[-1][:300] if last else "", "note": note})
        print(f"{category:12} {case:40} rc={rc} {outcome}{' LOST' if lost else ''}  {last[-1][:150] if last else ''}", flush=True)

    # --- fixtures --------------------------------------------------------------------------

    def base_run(self) -> tuple[Path, Path]:
        base = self.work / "base"
        if not base.exists():
            base.mkdir()
            (base / "quick.yaml").write_text(quick())
            rc, out, err = self.moec("train", base / "quick.yaml", "--run-dir", base / "run", "--no-plots")
            assert rc == 0, err
        return base / "quick.yaml", base / "run"

    def copy_run(self, name: str) -> Path:
        _, run = self.base_run()
        target = self.work / name
        shutil.copytree(run, target)
        return target


def digest(directory: Path, skip=()) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}


def reseal(ck: Path) -> None:
    manifest = ck / "manifest.json"
    if not manifest.exists():
        return
    data = json.loads(manifest.read_text())
    data["files"] = {p.relative_to(ck).as_posix(): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                     for p in sorted(ck.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    try:
        meta = json.loads((ck / "meta.json").read_text())
        if isinstance(meta, dict) and isinstance(meta.get("step"), int):
            data["step"] = meta["step"]
    except ValueError:
        pass
    manifest.write_text(json.dumps(data))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- categories ------------------------------------------------------------------------------

def security(s: Sweep):
    spec, _ = s.base_run()
    run = s.copy_run("sec-pickle")
    marker = s.work / "pwned"
    ck = run / "checkpoints" / "step_00000004"
    (ck / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    reseal(ck)
    rc, out, err = s.moec("train", spec, "--run-dir", run, "--resume", "latest", "--no-plots")
    s.record("security", "malicious .metadata on --resume", "refuse", rc, out, err,
             note="code ran" if marker.exists() else "no code ran")
    if marker.exists():
        s.results[-1]["outcome"] = "code-execution"
    for case, text in (("name: \"[/bad]\"", quick(name='"[/bad]"')),
                       ("checkpoint.dir: runs/[/x]", quick(dir_=', dir: "runs/[/x]"'))):
        d = s.work / f"sec-{len(s.results)}"
        d.mkdir()
        (d / "spec.yaml").write_text(text)
        rc, out, err = s.moec("train", d / "spec.yaml", "--no-plots", "--stop-at", "2", cwd=d)
        s.record("security", case, "succeed", rc, out, err)


def _edit_meta(change, seal=True):
    def apply(ck, run):
        meta = json.loads((ck / "meta.json").read_text())
        (ck / "meta.json").write_text(json.dumps(change(meta), indent=1))
        if seal:
            reseal(ck)
    return apply


def _flip(ck, run):
    data = bytearray((ck / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1
    (ck / "__0_0.distcp").write_bytes(bytes(data))


DAMAGE = {
    "meta.json step 4 -> 3": _edit_meta(lambda m: m | {"step": 3}, seal=False),
    "meta.json step -> -5": _edit_meta(lambda m: m | {"step": -5}, seal=False),
    "meta.json step -> 1000": _edit_meta(lambda m: m | {"step": 1000}, seal=False),
    "meta.json step a string": _edit_meta(lambda m: m | {"step": "4"}, seal=False),
    "meta.json is a list": _edit_meta(lambda m: [m], seal=False),
    "meta.json lacks step": _edit_meta(lambda m: {k: v for k, v in m.items() if k != "step"}, seal=False),
    "meta.json lacks spec": _edit_meta(lambda m: {k: v for k, v in m.items() if k != "spec"}, seal=False),
    "shard copied from step 2": lambda ck, run: shutil.copy(run / "checkpoints/step_00000002/__0_0.distcp", ck / "__0_0.distcp"),
    "one flipped bit in the shard": _flip,
    "truncated shard": lambda ck, run: (ck / "__0_0.distcp").write_bytes((ck / "__0_0.distcp").read_bytes()[:1000]),
    "empty shard": lambda ck, run: (ck / "__0_0.distcp").write_bytes(b""),
    "missing .metadata": lambda ck, run: (ck / ".metadata").unlink(),
}


def checkpoints(s: Sweep):
    spec, _ = s.base_run()
    for case, damage in DAMAGE.items():
        run = s.copy_run(f"ck-{len(s.results)}")
        ck = run / "checkpoints" / "step_00000004"
        damage(ck, run)
        before = digest(run / "checkpoints" / "step_00000002")
        rc, out, err = s.moec("train", spec, "--run-dir", run, "--resume", "latest", "--no-plots")
        lost = digest(run / "checkpoints" / "step_00000002") != before
        s.record("checkpoints", case, "refuse", rc, out, err, lost=lost)
    # changed data between runs
    d = s.work / "ck-data"
    (d / "data").mkdir(parents=True)
    for i in range(3):
        (d / "data" / f"p{i}.txt").write_text(f"file {i} " + "lorem ipsum dolor sit amet " * 40)
    (d / "spec.yaml").write_text(quick(files=f"{d}/data/*.txt"))
    s.moec("train", d / "spec.yaml", "--run-dir", d / "run", "--no-plots", "--stop-at", "2")
    (d / "data" / "p1.txt").write_text("changed " * 100)
    rc, out, err = s.moec("train", d / "spec.yaml", "--run-dir", d / "run", "--resume", "latest", "--no-plots")
    s.record("checkpoints", "data files changed before --resume", "refuse", rc, out, err)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def writes(s: Sweep):
    spec, _ = s.base_run()
    # metrics.jsonl with a torn last line: resume and plot
    run = s.copy_run("w-torn")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(rows[:-1]) + "\n" + rows[-1][: len(rows[-1]) // 2])
    rc, out, err = s.moec("plot", run)
    s.record("writes", "moec plot, torn last metrics line", "succeed", rc, out, err)
    rc, out, err = s.moec("train", spec, "--run-dir", run, "--resume", "latest", "--no-plots")
    s.record("writes", "--resume, torn last metrics line", "succeed", rc, out, err)
    # checkpoint.dir: "" writes into the current directory
    d = s.work / "w-empty-dir"
    d.mkdir()
    (d / "unrelated.txt").write_text("keep")
    (d / "spec.yaml").write_text(quick(dir_=', dir: ""'))
    before = set(os.listdir(d))
    rc, out, err = s.moec("train", d / "spec.yaml", "--no-plots", "--stop-at", "2", cwd=d)
    polluted = set(os.listdir(d)) != before
    s.record("writes", "checkpoint.dir: \"\"", "refuse", rc, out, err, lost=polluted, note="wrote into cwd" if polluted else "")
    # a full disk: a tmpfs, a first run to step 2, then a filler file that leaves `free` bytes
    ck_size = sum(p.stat().st_size for p in (s.base_run()[1] / "checkpoints" / "step_00000002").rglob("*") if p.is_file())
    for case, free, steps, every in (("full disk during a checkpoint save", ck_size // 2, 4, 2),
                                     ("full disk during metrics writes", 12_000, 400, 400)):
        mount = s.work / f"w-full-{len(s.results)}"
        if not _tmpfs(mount, "16m"):
            s.results.append({"category": "writes", "case": case, "outcome": "n/a", "lost": False, "rc": None, "message": "no tmpfs"})
            continue
        try:
            spec_path = s.work / f"{mount.name}.yaml"
            spec_path.write_text(quick(steps=steps, every=every))
            rc, out, err = s.moec("train", spec_path, "--run-dir", mount / "run", "--no-plots", "--stop-at", "2")
            assert rc == 0, err
            before = digest(mount / "run" / "checkpoints" / "step_00000002")
            stat = os.statvfs(mount)
            filler = max(0, stat.f_bavail * stat.f_frsize - free)
            with open(mount / "filler", "wb") as handle:
                handle.write(b"\0" * filler)
            rc, out, err = s.moec("train", spec_path, "--run-dir", mount / "run", "--no-plots", "--resume", "latest",
                                  "--allow-spec-change", timeout=600)
            metrics = mount / "run" / "metrics.jsonl"
            torn = not metrics.exists()
            for line in metrics.read_text().splitlines() if metrics.exists() else []:
                try:
                    json.loads(line)
                except ValueError:
                    torn = True
            lost = torn or digest(mount / "run" / "checkpoints" / "step_00000002") != before
            s.record("writes", case, "refuse", rc, out, err, lost=lost, note="torn metrics line" if torn else "")
            (mount / "filler").unlink()
            rc, out, err = s.moec("train", spec_path, "--run-dir", mount / "run", "--no-plots", "--resume", "latest",
                                  "--allow-spec-change", "--stop-at", "6", timeout=600)
            s.record("writes", case + ", then --resume with room", "succeed", rc, out, err)
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)
    # keep_last 2: room for 2.6 checkpoints must be enough (it needed keep_last + 1 = 3)
    mount = s.work / "w-keep"
    if _tmpfs(mount, str(int(ck_size * 2.6) + 200_000)):
        try:
            (s.work / "w-keep.yaml").write_text(quick(steps=8))
            rc, out, err = s.moec("train", s.work / "w-keep.yaml", "--run-dir", mount / "run", "--no-plots", timeout=600)
            s.record("writes", "keep_last 2 with room for 2.6 checkpoints", "succeed", rc, out, err)
        finally:
            subprocess.run(["umount", str(mount)], capture_output=True)


def bounds(s: Sweep):
    rc, out, err = s.moec("validate", "/dev/zero", timeout=30, limit_memory=2 << 30)
    s.record("bounds", "validate /dev/zero (2 GiB address limit)", "refuse", rc, out, err)
    fifo = s.work / "fifo.yaml"
    os.mkfifo(fifo)
    rc, out, err = s.moec("validate", fifo, timeout=15)
    s.record("bounds", "validate a FIFO", "refuse", rc, out, err)
    bomb = quick().replace("    - repeat: 2\n", "    - &b\n      repeat: 65536\n")
    bomb = bomb.replace("  head: {kind: lm}", "    " + "\n    ".join(["- *b"] * 255) + "\n  head: {kind: lm}")
    (s.work / "bomb.yaml").write_text(bomb)
    rc, out, err = s.moec("validate", s.work / "bomb.yaml", timeout=60)
    s.record("bounds", "layer-count bomb (65536 x 256 blocks)", "refuse", rc, out, err)
    spectral = (s.checkout / "specs" / "spectral_moe.yaml").read_text()
    band = spectral.replace("max_seq_len: 256", "max_seq_len: 1048576").replace("d_model: 64", "d_model: 262144")
    band = band.replace("repeat: 2", "repeat: 64").replace("hidden: 256", "hidden: 1")
    (s.work / "band.yaml").write_text(band)
    rc, out, err = s.moec("validate", s.work / "band.yaml", timeout=60)
    s.record("bounds", "spectral band table of 1.76e13 parameters", "refuse", rc, out, err)
    # a 1 GiB (sparse) text file as data: peak RSS of a 1-step run
    d = s.work / "b-big"
    d.mkdir()
    with open(d / "big.txt", "wb") as handle:
        handle.truncate(1 << 30)
    (d / "small.txt").write_text("hello world " * 200)
    (d / "spec.yaml").write_text(quick(files=f"{d}/*.txt", steps=2))
    cmd = [sys.executable, "-m", "moec.cli.main", "train", str(d / "spec.yaml"), "--run-dir", str(d / "run"), "--no-plots"]
    proc = subprocess.Popen(cmd, cwd=s.checkout, env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    rc = os.waitstatus_to_exitcode(status)
    s.record("bounds", "1 GiB text file as data", "succeed", rc, "", err, note=f"peak RSS {usage.ru_maxrss / 1024:.0f} MiB")


YAML = [
    ("flow nesting 600 levels", "steps: 4", "steps: " + "[" * 600 + "]" * 600),
    ("raw NUL byte", "name: quick", "name: qu\x00ick"),
    ("raw ESC byte", "name: quick", "name: qu\x1bick"),
    ("raw DEL byte", "name: quick", "name: qu\x7fick"),
    ("int literal of 5000 digits", "steps: 4", "steps: " + "9" * 5000),
    ("version: true", "version: 1", "version: true"),
    ("version: 1.0", "version: 1", "version: 1.0"),
    ("steps: 1:20 (base 60)", "steps: 4", "steps: 1:20"),
]


def yaml_cases(s: Sweep):
    for case, old, new in YAML:
        path = s.work / f"y-{len(s.results)}.yaml"
        path.write_bytes(quick().replace(old, new).encode())
        rc, out, err = s.moec("validate", path, timeout=60)
        s.record("yaml", case, "refuse", rc, out, err)


def paths(s: Sweep):
    spec, _ = s.base_run()
    afile = s.work / "afile"
    afile.write_text("x")
    rc, out, err = s.moec("build", s.checkout / "specs" / "token_routed_tiny.yaml", "-o", afile / "out")
    s.record("paths", "build -o under a file", "refuse", rc, out, err)
    rc, out, err = s.moec("train", spec, "--run-dir", s.work / "p-cache", "--no-plots",
                          env=dict(s.env, MOEC_CACHE_DIR=str(afile / "cache")))
    s.record("paths", "MOEC_CACHE_DIR under a file", "refuse", rc, out, err)
    rc, out, err = s.moec("train", spec, "--run-dir", afile, "--no-plots")
    s.record("paths", "--run-dir is a file", "refuse", rc, out, err)
    d = s.work / "p-proc"
    d.mkdir()
    (d / "a.txt").write_text("x" * 1000)
    os.symlink("/proc/self/mem", d / "b.txt")
    (d / "spec.yaml").write_text(quick(files=f"{d}/*.txt"))
    rc, out, err = s.moec("train", d / "spec.yaml", "--run-dir", d / "run", "--no-plots")
    s.record("paths", "/proc/self/mem as a data file", "refuse", rc, out, err)
    # SIGINT during a long evaluation, then two SIGINTs
    for case, count, expect in (("SIGINT during a 5000-batch evaluation", 1, 130), ("two SIGINTs during an evaluation", 2, 130)):
        d = s.work / f"p-sig-{len(s.results)}"
        d.mkdir()
        (d / "spec.yaml").write_text(quick(steps=8, eval_batches=5000))
        cmd = [sys.executable, "-m", "moec.cli.main", "train", str(d / "spec.yaml"), "--run-dir", str(d / "run"), "--no-plots"]
        proc = subprocess.Popen(cmd, cwd=s.checkout, env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = d / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        time.sleep(0.5)  # inside the evaluation of step 2
        sent = time.monotonic()
        for _ in range(count):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
        try:
            out, err = proc.communicate(timeout=30)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
        s.record("signals", case, expect, rc, out, err, note=f"stopped after {time.monotonic() - sent:.1f} s")


def _hf_mixtral(s: Sweep, name: str) -> Path:
    """A copy of a tiny random Mixtral directory written by transformers from a config (nothing downloaded)."""
    base = s.work / "hf-base"
    if not base.exists():
        import torch
        import transformers as T

        torch.manual_seed(0)
        config = T.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, num_local_experts=4)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    return Path(shutil.copytree(base, s.work / name))


def _edit_config(**changes):
    def apply(hf):
        (hf / "config.json").write_text(json.dumps(json.loads((hf / "config.json").read_text()) | changes))
    return apply


def _edit_tensors(change):
    def apply(hf):
        from safetensors.torch import load_file, save_file

        state = load_file(hf / "model.safetensors")
        change(state)
        save_file(state, hf / "model.safetensors", metadata={"format": "pt"})
    return apply


def _header_bomb(path: Path) -> None:
    path.write_bytes((1 << 62).to_bytes(8, "little") + path.read_bytes()[8:])


def _pickled_only(hf):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()


def _small_q_proj(state):
    import torch

    state["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(3, 3)


def _non_finite(state):
    state["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    state["model.norm.weight"][1] = float("inf")


IMPORTS = {  # case -> (damage, expect); "warn": exit 0 with a warning line
    "weights only as pytorch_model.bin (a pickle)": (_pickled_only, "refuse"),
    "model.safetensors header length 2^62": (lambda hf: _header_bomb(hf / "model.safetensors"), "refuse"),
    "config vocab_size 10^12, embedding 64 rows": (_edit_config(vocab_size=10**12), "refuse"),
    "a q_proj replaced by a [3, 3] tensor": (_edit_tensors(_small_q_proj), "refuse"),
    "num_local_experts: 0": (_edit_config(num_local_experts=0), "refuse"),
    "NaN and inf in two tensors": (_edit_tensors(_non_finite), "warn"),
}


def imports(s: Sweep):
    for case, (damage, expect) in IMPORTS.items():
        hf = _hf_mixtral(s, f"i-{len(s.results)}")
        damage(hf)
        out = s.work / f"i-out-{len(s.results)}"
        rc, stdout, err = s.moec("import", "hf", hf, "-o", out / "m.yaml")
        left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        s.record("import", case, "succeed" if expect == "warn" else expect, rc, stdout, err,
                 note=f"left {', '.join(left)}" if expect == "refuse" and left else "")
        if expect == "warn" and rc == 0 and "warning:" not in err:
            s.results[-1]["outcome"] = "silent"
    hf = _hf_mixtral(s, "i-export")
    assert s.moec("import", "hf", hf, "-o", s.work / "i-export" / "m.yaml")[0] == 0
    _header_bomb(s.work / "i-export" / "m.safetensors")
    rc, out, err = s.moec("export", "hf", s.work / "i-export" / "m.yaml", "-o", s.work / "i-export-back")
    s.record("import", "export hf: weights header length 2^62", "refuse", rc, out, err)
    rc, out, err = s.moec("train", s.work / "i-export" / "m.yaml", "--init-from", s.work / "i-export" / "m.safetensors",
                          "--run-dir", s.work / "i-export-run", "--no-plots")
    s.record("import", "train --init-from: header length 2^62", "refuse", rc, out, err)
    run = s.copy_run("i-ck")
    _flip(run / "checkpoints" / "step_00000004", run)
    rc, out, err = s.moec("export", "hf", run / "checkpoints" / "step_00000004", "-o", s.work / "i-ck-back")
    s.record("import", "export hf: checkpoint with a flipped bit", "refuse", rc, out, err)


CATEGORIES = {"security": security, "checkpoints": checkpoints, "writes": writes, "bounds": bounds, "yaml": yaml_cases,
              "paths": paths, "import": imports}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkout", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", action="append", choices=list(CATEGORIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moec-sweep-") as tmp:
        sweep = Sweep(args.checkout.resolve(), Path(tmp))
        for name in args.only or CATEGORIES:
            CATEGORIES[name](sweep)
    args.out.write_text(json.dumps(sweep.results, indent=1))
    table: dict = {}
    for row in sweep.results:
        t = table.setdefault(row["category"], {"tried": 0, "clean": 0, "traceback": 0, "silent": 0, "hang": 0, "failed": 0,
                                               "lost": 0, "other": 0})
        t["tried"] += 1
        key = row["outcome"] if row["outcome"] in t else "other"
        t[key] += 1
        t["lost"] += bool(row["lost"])
    print("| category | tried | clean | tracebacks | silently accepted | hangs | refused what should work | other | data lost |")
    for name, t in table.items():
        print(f"| {name} | {t['tried']} | {t['clean']} | {t['traceback']} | {t['silent']} | {t['hang']} | {t['failed']} | "
              f"{t['other']} | {t['lost']} |")


if __name__ == "__main__":
    main()
