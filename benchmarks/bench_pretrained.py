"""MAS step / plain forward+backward on the real pretrained models, with and without prefix caching.

For SmolLM2-135M and Gemma-3-270M (``masalign.pretrained.load_pretrained``), on
16 counting prompts ("3, 4, 5, 6, ...", about 20 tokens, left-padded), k = 8, one
direction (DAS within the model), at an early, a middle and a late layer:

- plain: a plain training step's forward+backward of the model (cross-entropy
  of the next token at every position, backward into every parameter), the
  baseline a user compares to;
- MAS: one training step of the alignment (intervened forward, loss at the label
  position, backward into the alignment, Adam step), the model frozen;
- MAS + prefix: the same step run from the cached states at the site
  (``fit(prefix_cache=True)``), only the blocks after the site;
- MAS + prefix + label logits: as well, the unembedding only at the labelled
  position (:mod:`masalign.logit_rows`), not at every one;
- + keys/values: as well, the later blocks run the intervened (last) position only,
  over the cached keys and values of the positions before it (what ``fit`` does
  where the adapter supports it: a Hugging Face model through nnsight or a
  TransformerLens ``TransformerBridge``; :mod:`masalign.adapters.key_values`).

``--repeats`` rounds (default 3) after one warm-up of each step; each round times every
step once, side by side, and the ratios are the medians of the ratios within a round (other
jobs on a shared machine slow a round's steps alike). Run: ``python benchmarks/bench_pretrained.py [--json PATH] [--backend nnsight]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics

import torch
from bench_mas import timed

from masalign import ModelAlignment
from masalign.data import IGNORE_INDEX
from masalign.logit_rows import label_slots
from masalign.objectives import intervention_loss
from masalign.adapters.resume import KeyValuePrefix
from masalign.prefix import base_prefixes
from masalign.pretrained import load_pretrained
from masalign.train import frozen_models

MODELS = ("smollm2-135m", "gemma3-270m")
K = 8


def counting_prompts(tokenizer, n: int = 16) -> dict[str, torch.Tensor]:
    """``n`` runs of consecutive numbers ("3, 4, 5, 6, 7, 8,"), left-padded to one length."""
    texts = [", ".join(str(start + i) for i in range(6 + start % 3)) + "," for start in range(3, 3 + n)]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def site_name(backend: str, layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post" if backend == "transformer_lens" else f"model.layers.{layer}.output"


def token_key(backend: str) -> str:
    return "input" if backend == "transformer_lens" else "input_ids"


def bench_model(name: str, backend: str, repeats: int) -> dict:
    adapter, tokenizer = load_pretrained(name, backend=backend)
    model = adapter.model
    encoded = counting_prompts(tokenizer)
    inputs = {token_key(backend): encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    tokens, mask = encoded["input_ids"], encoded["attention_mask"]
    batch, seq = tokens.shape
    n_layers = model.config.num_hidden_layers if hasattr(model, "config") else len(model.blocks)
    # Plain step: next-token loss at every real position, gradient into every parameter.
    next_tokens = torch.where(mask[:, 1:].bool(), tokens[:, 1:], IGNORE_INDEX)
    plain_labels = torch.cat([next_tokens, torch.full((batch, 1), IGNORE_INDEX)], 1)
    # MAS: the last prompt position is intervened on and labelled (the next number).
    positions = torch.full((batch, 1), seq - 1)
    mas_labels = torch.full((batch, seq), IGNORE_INDEX)
    mas_labels[:, -1] = tokens[:, -2]  # any in-vocabulary token serves for timing
    source_rows = torch.arange(batch).roll(1)

    def plain_step() -> None:
        model.zero_grad(set_to_none=True)
        intervention_loss(adapter.logits(inputs), plain_labels).backward()

    steps = {}
    layers = {"early": n_layers // 6, "middle": n_layers // 2, "late": n_layers - 2}
    for where, layer in layers.items():
        site = site_name(backend, layer)
        alignment = ModelAlignment({"m": adapter}, site, subspace_dim=K)
        with frozen_models(alignment):
            hidden = alignment.source_activations("m", inputs, positions)[source_rows]
            prefix = base_prefixes(adapter, site, inputs, positions, alignment.widths["m"])
            key_value_prefix = base_prefixes(adapter, site, inputs, positions, alignment.widths["m"], start=seq - 1)
        assert prefix is not None, f"{name} cannot resume at {site}"
        assert isinstance(key_value_prefix, KeyValuePrefix), f"{name} cannot run from cached keys and values at {site}"
        optimizer = torch.optim.Adam(alignment.parameters(), lr=1e-3)

        def mas_step(alignment=alignment, optimizer=optimizer, hidden=hidden, base_prefix=None, at_labels=False) -> None:
            with frozen_models(alignment):
                optimizer.zero_grad(set_to_none=True)
                if at_labels:
                    logit_positions, labels = label_slots(mas_labels)
                else:
                    logit_positions, labels = None, mas_labels
                logits = alignment.intervened_logits(
                    "m", "m", hidden, inputs, positions, base_prefix=base_prefix, logit_positions=logit_positions
                )
                intervention_loss(logits, labels).backward()
                optimizer.step()

        steps[where, layer, "mas"] = mas_step
        steps[where, layer, "mas_prefix"] = functools.partial(mas_step, base_prefix=prefix)
        steps[where, layer, "mas_prefix_labels"] = functools.partial(mas_step, base_prefix=prefix, at_labels=True)
        steps[where, layer, "mas_key_values"] = functools.partial(mas_step, base_prefix=key_value_prefix, at_labels=True)

    def plain_step_with_grads() -> None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        plain_step()
        model.zero_grad(set_to_none=True)

    # Round-robin: each round times every step once, and ratios are taken within a
    # round, so that other jobs on a shared machine slow all of them alike.
    everything = {"plain": plain_step_with_grads, **steps}
    rounds = [{key: timed(step, 1, warmup=1 if index == 0 else 0) for key, step in everything.items()} for index in range(repeats)]
    plain = statistics.median(r["plain"] for r in rounds)
    rows = []
    for where, layer in layers.items():
        kinds = ("mas", "mas_prefix", "mas_prefix_labels", "mas_key_values")
        ratio = {kind: statistics.median(r[where, layer, kind] / r["plain"] for r in rounds) for kind in kinds}
        rows.append({"where": where, "layer": layer, "site": site_name(backend, layer),
                     "mas_s": statistics.median(r[where, layer, "mas"] for r in rounds),
                     "mas_prefix_s": statistics.median(r[where, layer, "mas_prefix"] for r in rounds),
                     "mas_prefix_labels_s": statistics.median(r[where, layer, "mas_prefix_labels"] for r in rounds),
                     "mas_key_values_s": statistics.median(r[where, layer, "mas_key_values"] for r in rounds),
                     "mas_over_plain": ratio["mas"], "mas_prefix_over_plain": ratio["mas_prefix"],
                     "mas_prefix_labels_over_plain": ratio["mas_prefix_labels"], "mas_key_values_over_plain": ratio["mas_key_values"]})
    return {"model": name, "backend": backend, "n_layers": n_layers, "batch": batch, "seq": seq, "plain_s": plain,
            "rounds": [{"/".join(map(str, key)) if isinstance(key, tuple) else key: t for key, t in r.items()} for r in rounds],
            "layers": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--backend", default="nnsight", choices=("transformer_lens", "nnsight"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = [bench_model(name, args.backend, args.repeats) for name in args.models]

    print(f"MAS step / plain forward+backward (k={K}, 16 prompts, backend {args.backend}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"{'model':<14}{'layer':>12}{'plain (s)':>11}{'MAS':>8}{'MAS+prefix':>12}{'+label logits':>15}{'+keys/values':>14}")
    for result in results:
        for row in result["layers"]:
            where = f"{row['where']} {row['layer']}/{result['n_layers']}"
            print(f"{result['model']:<14}{where:>12}{result['plain_s']:>11.3f}"
                  f"{row['mas_over_plain']:>8.2f}{row['mas_prefix_over_plain']:>12.2f}{row['mas_prefix_labels_over_plain']:>15.2f}"
                  f"{row['mas_key_values_over_plain']:>14.4f}")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "platform": platform.platform(), "load_average": os.getloadavg()}
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "k": K, "repeats": args.repeats, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
