"""pyvene's side of ``bench_das_pyvene.py``; runs in the pyvene virtual environment, not masalign's.

Trains DAS as a pyvene user does (``LowRankRotatedSpaceIntervention`` at one
component, Adam on the intervention's parameters, cross-entropy of the answer
at the last position) on the pairs and the model ``bench_das_pyvene.py`` wrote,
and writes its history as JSON. Two ways to feed the sources:

- ``users``: as the pyvene tutorials do, the source prompts are passed with every
  batch, so every step runs the model on them too;
- ``cached``: the source representations (block output at the source position)
  are read once before training, with the model's own ``output_hidden_states``,
  and passed as ``source_representations`` (pyvene's supported way to reuse them).

Timing: each training step (forward, backward, optimiser step) is timed; the
validations between steps are not counted (``train_seconds``), as in masalign's
``fit`` history. The setup (caching sources) counts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pyvene  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--mode", choices=("users", "cached"), required=True)
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--eval-every", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    data = load_file(args.data)
    position = int(data["position"])
    model = GPT2LMHeadModel.from_pretrained(args.model).eval()
    config = pyvene.IntervenableConfig(
        representations=[{"layer": args.layer, "component": "block_output", "low_rank_dimension": args.k}],
        intervention_types=pyvene.LowRankRotatedSpaceIntervention,
    )
    intervenable = pyvene.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    optimizer = torch.optim.Adam(intervenable.get_trainable_parameters(), lr=args.lr)

    def source_states(tokens: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s output at the source position, ``(rows, 1, d)``: hidden_states[layer + 1]."""
        with torch.no_grad():
            hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states[args.layer + 1]
        return hidden[:, position : position + 1]

    def logits(base: torch.Tensor, source: torch.Tensor | None, cached: torch.Tensor | None) -> torch.Tensor:
        if cached is None:
            _, out = intervenable({"input_ids": base}, [{"input_ids": source}], {"sources->base": position})
        else:
            _, out = intervenable({"input_ids": base}, unit_locations={"sources->base": position}, source_representations=cached)
        return out.logits[:, -1]

    def iia(split: str, cached: torch.Tensor | None) -> float:
        base, source, labels = data[f"{split}_base"], data[f"{split}_source"], data[f"{split}_labels"]
        correct = 0
        with torch.no_grad():
            for start in range(0, len(base), 256):
                rows = slice(start, start + 256)
                predicted = logits(base[rows], source[rows], None if cached is None else cached[rows]).argmax(-1)
                correct += int((predicted == labels[rows]).sum())
        return correct / len(base)

    # All sources are read before the first intervened call: after pyvene's calls, the model's
    # own output_hidden_states comes back short (pyvene leaves its hook state on the model).
    start = time.perf_counter()
    train_cached = source_states(data["train_source"]) if args.mode == "cached" else None
    setup_seconds = time.perf_counter() - start
    valid_cached = source_states(data["valid_source"]) if args.mode == "cached" else None  # a validation cost: not timed
    test_cached = source_states(data["test_source"]) if args.mode == "cached" else None

    n_train = len(data["train_base"])
    order = random.Random(args.seed)
    history = [{"step": 0, "valid_iia": iia("valid", valid_cached), "train_seconds": setup_seconds}]
    best_iia, best_state = history[0]["valid_iia"], _state(intervenable)
    train_seconds, step_seconds = setup_seconds, []
    rows: list[int] = []
    for step in range(1, args.steps + 1):
        if len(rows) < args.batch_size:
            epoch = list(range(n_train))
            order.shuffle(epoch)
            rows += epoch
        batch, rows = torch.tensor(rows[: args.batch_size]), rows[args.batch_size :]
        started = time.perf_counter()
        out = logits(
            data["train_base"][batch],
            data["train_source"][batch],
            None if train_cached is None else train_cached[batch],
        )
        loss = torch.nn.functional.cross_entropy(out, data["train_labels"][batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - started)
        train_seconds += step_seconds[-1]
        if step % args.eval_every == 0 or step == args.steps:
            value = iia("valid", valid_cached)
            history.append({"step": step, "valid_iia": value, "train_seconds": train_seconds})
            if value > best_iia:
                best_iia, best_state = value, _state(intervenable)
    # As masalign's fit does: keep the best validated state, then test it.
    _load_state(intervenable, best_state)
    result = {
        "mode": args.mode,
        "pyvene": pyvene.__version__ if hasattr(pyvene, "__version__") else _version("pyvene"),
        "torch": torch.__version__,
        "setup_seconds": setup_seconds,
        "step_seconds": step_seconds,
        "history": history,
        "best_valid_iia": best_iia,
        "test_iia": iia("test", test_cached),
    }
    with open(args.out, "w") as handle:
        json.dump(result, handle)


def _state(intervenable: pyvene.IntervenableModel) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in intervenable.get_trainable_parameters()]


def _load_state(intervenable: pyvene.IntervenableModel, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for parameter, saved in zip(intervenable.get_trainable_parameters(), state, strict=True):
            parameter.copy_(saved)


def _version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


if __name__ == "__main__":
    main()
