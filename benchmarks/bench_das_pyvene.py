"""DAS within one model: masalign against pyvene, on the same model, pairs, site, positions and k.

The model is the 64-wide, 2-layer GPT-2 of ``examples/align_hf_language_models.py``
(trained here, saved with ``save_pretrained``); the task is its variable binding
(``a = 3 , b = 5 , c = 1 ; b`` -> ``5``), the variable the queried value. DAS is
trained at block 0's output, at the last token (the queried name), k = 8, Adam at
lr 1e-2, batch 64, one thread, on the same counterfactual pairs:

- pyvene 0.1.8 (``LowRankRotatedSpaceIntervention``, its own virtual environment,
  made on first use with pip: ``--pyvene-python`` to use another), run as its
  users run it (the source prompts through the model with every batch) and with
  the sources cached (``source_representations``);
- masalign ``fit`` (source = target = the one model), each orthogonal
  parametrisation (QR retraction, Householder, Cayley), through the nnsight
  adapter on the same Hugging Face model.

Printed, side by side in one run: time per training step, the set-up (caching),
the validation IIA over training (validations are not timed, on either side), the
wall time to reach 0.95 of the best validation IIA, and the test IIA of the best
state, at lr 1e-2 and (``--lrs``) at 1e-3 and 3e-2 on both sides. Time per step
is given over the whole run, over its first epoch and over its second half
("steady"): masalign reads each row's source and base states the first time a
batch holds it, so its first-epoch steps also run the model on those rows.
``--json PATH`` writes it all. With ``--repeats N`` every configuration runs N
times, interleaved, and the timings compared are the medians (a configuration's
timings vary by up to a third between runs on a 2-core machine). Run:

    python benchmarks/bench_das_pyvene.py [--json PATH] [--quick] [--repeats N]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench_mas import cpu_name  # noqa: E402

from masalign import ModelAlignment, evaluate, fit  # noqa: E402
from masalign.adapters import NNsightAdapter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYVENE_SPEC = "pyvene==0.1.8"
LAYER, K, BATCH, LR = 0, 8, 64, 1e-2
FRACTION = 0.95  # time to reach this fraction of the best validation IIA


def load_example() -> Any:
    """``examples/align_hf_language_models.py`` as a module: its task, model and training."""
    spec = importlib.util.spec_from_file_location("align_hf_example", ROOT / "examples" / "align_hf_language_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def pyvene_python(path: Path) -> Path:
    """The pyvene environment's python, made with pip on first use (torch pinned first, as setup.sh does)."""
    python = path / "bin" / "python"
    check = [str(python), "-c", "import pyvene"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"making the pyvene environment in {path} (once; a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    torch_spec = os.environ.get("MASALIGN_TORCH", f"torch=={torch.__version__.split('+')[0]}").split()
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *torch_spec], check=True)
    subprocess.run([*pip, PYVENE_SPEC], check=True)
    subprocess.run(check, check=True)
    return python


def write_pairs(example: Any, vocabulary: dict[str, int], sizes: dict[str, int], path: Path) -> dict[str, Any]:
    """The same pairs for both sides: masalign's views, and a safetensors file for the worker."""
    tensors, views = {}, {}
    for seed, split in enumerate(("train", "valid", "test"), start=1):
        bases, sources = example.sample_interchange(sizes[split], random.Random(seed))
        view = example.counterfactual_view(bases, sources, example.FORMAT_A, vocabulary)
        views[split] = view
        tensors[f"{split}_base"] = view.base_inputs
        tensors[f"{split}_source"] = view.source_inputs
        tensors[f"{split}_labels"] = view.labels[:, -1].contiguous()
    position = int(views["train"].base_positions[0, 0])
    assert (views["train"].base_positions == position).all() and (views["train"].source_positions == position).all()
    tensors["position"] = torch.tensor(position)
    save_file(tensors, str(path))
    return views


def summarise(history: list[dict[str, Any]], setup: float, test_iia: float, steps: int, epoch_steps: int) -> dict[str, Any]:
    """Setup, time per step (over the run, over its first epoch, when masalign also reads each
    row it meets, and over its second half, when every cache is full), best validation IIA, and
    when ``FRACTION`` of it was first reached."""
    best = max(entry["valid_iia"] for entry in history)
    reached = next(entry for entry in history if entry["valid_iia"] >= FRACTION * best)
    middle = next(entry for entry in history if entry["step"] >= steps // 2)
    epoch = next((entry for entry in history if entry["step"] >= epoch_steps), history[-1])
    last = history[-1]
    return {
        "setup_s": setup,
        "step_ms": 1000 * (last["train_seconds"] - setup) / last["step"],
        "first_epoch_step_ms": 1000 * (epoch["train_seconds"] - setup) / epoch["step"],
        "steady_step_ms": 1000 * (last["train_seconds"] - middle["train_seconds"]) / (last["step"] - middle["step"]),
        "best_valid_iia": best,
        "test_iia": test_iia,
        "steps_to_fraction": reached["step"],
        "seconds_to_fraction": reached["train_seconds"],
        "steps": steps,
        "curve": [(entry["step"], round(entry["valid_iia"], 4), round(entry["train_seconds"], 4)) for entry in history],
    }


def run_masalign(
    example: Any, folder: Path, views: dict[str, Any], parametrization: str, lr: float, steps: int, eval_every: int
) -> dict[str, Any]:
    from nnsight import NNsight
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    adapter = NNsightAdapter(NNsight(model), name="gpt2")
    alignment = ModelAlignment(
        {"gpt2": adapter},
        {"gpt2": f"transformer.h.{LAYER}.output"},
        subspace_dim={views["train"].variable: K},
        alignment_options={"parametrization": parametrization},
        seed=0,
    )
    result = fit(
        alignment,
        views["train"],
        views["valid"],
        steps=steps,
        batch_size=BATCH,
        lr=lr,
        eval_every=eval_every,
        patience=10**9,
        target_accuracy=2.0,  # never stop early: both sides run every step
        progress=False,
    )
    history = [
        {"step": h["step"], "valid_iia": h["valid_accuracy"][views["train"].variable]["gpt2"]["gpt2"], "train_seconds": h["train_seconds"]}
        for h in result.history
    ]
    test_iia = evaluate(alignment, views["test"], directions=[("gpt2", "gpt2")]).iia["gpt2"]["gpt2"]
    return summarise(history, history[0]["train_seconds"], test_iia, result.steps, len(views["train"]) // BATCH)


def run_pyvene(
    python: Path, folder: Path, data: Path, mode: str, lr: float, steps: int, eval_every: int, threads: int, epoch_steps: int
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [
        str(python), str(ROOT / "benchmarks" / "pyvene_das_worker.py"), "--model", str(folder), "--data", str(data),
        "--mode", mode, "--layer", str(LAYER), "--k", str(K), "--steps", str(steps), "--batch-size", str(BATCH),
        "--lr", str(lr), "--eval-every", str(eval_every), "--threads", str(threads), "--out", str(out),
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    result = json.loads(out.read_text())
    out.unlink()
    summary = summarise(result["history"], result["setup_seconds"], result["test_iia"], steps, epoch_steps)
    summary["versions"] = {"pyvene": result["pyvene"], "torch": result["torch"]}
    return summary


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write every run, the settings and the machine here")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (a smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300, quick 40)")
    parser.add_argument("--eval-every", type=int, default=2, help="validate every this many steps (not timed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-3, 3e-2], help="more learning rates, for both sides")
    parser.add_argument("--pyvene-python", default=None, help="a python with pyvene installed (default: made in .venv-pyvene)")
    parser.add_argument("--workdir", default=None, help="where the model and the pairs go (default: a temporary folder)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every configuration this many times, interleaved; timings are the medians"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (40 if args.quick else 300)
    sizes = {"train": 512, "valid": 128, "test": 256} if args.quick else {"train": 4096, "valid": 256, "test": 1024}
    python = Path(args.pyvene_python) if args.pyvene_python else pyvene_python(ROOT / ".venv-pyvene")

    example = load_example()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_das_pyvene_"))
    checkpoint = example.CHECKPOINTS[0]
    folder = workdir / checkpoint.name
    if not (folder / "config.json").exists():
        accuracy, trained = example.train_checkpoint(checkpoint, folder, max_steps=600 if args.quick else 2000)
        print(f"model: {checkpoint.name} (GPT-2, n_embd {checkpoint.n_embd}, {checkpoint.n_layer} layers), held-out accuracy {accuracy:.3f} after {trained} steps")
    vocabulary = example.load_vocabulary(folder)
    data = workdir / "pairs.safetensors"
    views = write_pairs(example, vocabulary, sizes, data)
    print(f"pairs: train {sizes['train']}, valid {sizes['valid']}, test {sizes['test']}; site block {LAYER} output, last token, k {K}, batch {BATCH}, {args.threads} thread(s), {steps} steps")

    # Repeats run every configuration once before any runs twice, so that a slow spell of
    # the machine falls on all of them alike; the medians are compared.
    trials: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        if args.repeats > 1:
            print(f"repeat {repeat + 1} of {args.repeats}")
        for lr in (LR, *args.lrs):
            for mode in ("users", "cached"):
                name = f"pyvene {mode} lr {lr:g}"
                run = run_pyvene(python, folder, data, mode, lr, steps, args.eval_every, args.threads, sizes["train"] // BATCH)
                trials.setdefault(name, []).append(run)
                print_run(name, run)
            for parametrization in ("qr", "householder", "cayley"):
                name = f"masalign {parametrization} lr {lr:g}"
                run = run_masalign(example, folder, views, parametrization, lr, steps, args.eval_every)
                trials.setdefault(name, []).append(run)
                print_run(name, run)
    runs = {name: median_run(repeated) for name, repeated in trials.items()}
    if args.repeats > 1:
        print(f"\nmedians over {args.repeats} repeats")
        for name, run in runs.items():
            print_run(name, run)

    print_race(runs, [LR, *args.lrs])
    if args.json:
        settings = {"layer": LAYER, "k": K, "batch_size": BATCH, "lr": LR, "steps": steps, "eval_every": args.eval_every,
                    "threads": args.threads, "sizes": sizes, "fraction": FRACTION, "repeats": args.repeats}  # fmt: skip
        Path(args.json).write_text(json.dumps({"settings": settings, "machine": machine(), "runs": runs}, indent=1))
        print(f"wrote {args.json}")


TIMINGS = ("setup_s", "step_ms", "first_epoch_step_ms", "steady_step_ms", "seconds_to_fraction")


def median_run(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The first trial (its curve, IIA and steps), with each timing the median over the trials,
    which are all kept, without their curves, under ``repeats``."""
    run = dict(trials[0])
    for key in TIMINGS:
        run[key] = statistics.median(trial[key] for trial in trials)
    if len(trials) > 1:
        run["repeats"] = [{key: value for key, value in trial.items() if key != "curve"} for trial in trials]
    return run


def print_run(name: str, run: dict[str, Any]) -> None:
    print(
        f"  {name:30s} step {run['step_ms']:6.2f} ms (first epoch {run['first_epoch_step_ms']:6.2f}, steady {run['steady_step_ms']:6.2f})  "
        f"setup {run['setup_s']:5.2f} s  "
        f"best valid IIA {run['best_valid_iia']:.3f}, {FRACTION:.2f} of it at step {run['steps_to_fraction']:4d} "
        f"({run['seconds_to_fraction']:5.2f} s)  test IIA {run['test_iia']:.3f}",
        flush=True,
    )


def print_race(runs: dict[str, dict[str, Any]], lrs: list[float]) -> None:
    """Ratios pyvene / masalign (above 1: masalign faster), at each learning rate."""
    for lr in lrs:
        print(f"\nthe race at lr {lr:g}: pyvene / masalign (above 1: masalign is faster)")
        print(
            f"  {'':46s} {'first-epoch step':>16s} {'steady step':>11s} {'to ' + format(FRACTION, '.2f') + ' of best IIA':>20s} "
            f"{'test IIA diff':>14s}"
        )
        for mode in ("users", "cached"):
            peer = runs[f"pyvene {mode} lr {lr:g}"]
            for parametrization in ("qr", "householder", "cayley"):
                ours = runs[f"masalign {parametrization} lr {lr:g}"]
                print(
                    f"  {'pyvene ' + mode + ' / masalign ' + parametrization:46s} "
                    f"{peer['first_epoch_step_ms'] / ours['first_epoch_step_ms']:15.2f}x "
                    f"{peer['steady_step_ms'] / ours['steady_step_ms']:10.2f}x "
                    f"{peer['seconds_to_fraction'] / ours['seconds_to_fraction']:19.2f}x "
                    f"{ours['test_iia'] - peer['test_iia']:+14.3f}"
                )


if __name__ == "__main__":
    main()
