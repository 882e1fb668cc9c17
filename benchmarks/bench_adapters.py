"""What each adapter costs: one MAS training step over a plain training step of the same model.

For every (adapter, model) row, on the same batch of 128 Multi-Object
counterfactual pairs (padded to the longest, about 60 tokens):

- plain: the model's own forward + backward (cross-entropy on the pairs' labels,
  gradients for every weight), the cost of ordinary training;
- MAS: ``ModelAlignment.intervened_logits`` for one direction (the model into
  itself, k = 16, source activations precomputed as in :func:`masalign.fit`) +
  ``loss.backward()`` into the alignment, the model frozen.

The two are timed alternately, repeat by repeat, so that load from other
processes falls on both alike; each column is the median. The ratio is the
adapter's price per direction (the interchange itself included).

Rows: a GRU language model (d = 128) through ``TorchModuleAdapter`` at its
recurrent state ``rnn.h_l0`` (split recurrence) and at its ``embedding`` output,
and through ``NNsightAdapter`` (``NNsight(gru)``) at ``embedding.output``: the
same intervention as the row above it, so those two rows compare the backends
(nnsight cannot split a fused GRU at a step, so it has no ``h_l0`` site);
``TransformerLensAdapter`` on a ``TransformerBridge`` from ``boot_native`` (2
layers, d_model 128, 1 head, rotary); a GPT-2-architecture Hugging Face model of
the same size (2 layers, n_embd 128, 1 head) loaded from a local folder through
``TransformerBridge.boot_transformers`` and through nnsight's
``TransformersModel``. Transformer sites: the residual stream after block 0.

A ratio below 1 is expected: the MAS step computes no weight gradients, only
those of the activations on the way back to the site.

One thread by default: models this small gain nothing from a second, and on a
machine shared with other jobs a second thread waits at every operation, which
would swamp what is measured.

Run: ``python benchmarks/bench_adapters.py [--repeats 15] [--threads 1]``
"""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: everything here is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from masalign import ModelAlignment  # noqa: E402
from masalign.adapters import ModelAdapter, NNsightAdapter, TorchModuleAdapter, TransformerLensAdapter  # noqa: E402
from masalign.data import CounterfactualPairs  # noqa: E402
from masalign.objectives import intervention_loss  # noqa: E402
from masalign.models import RecurrentConfig, RecurrentLM  # noqa: E402
from masalign.tasks import VOCAB_SIZE, get_task  # noqa: E402

WIDTH = 128
SUBSPACE_DIM = 16
N_CTX = 96  # Multi-Object counterfactual sequences run up to about 63 tokens


@dataclass
class Case:
    """One row: a model, how to run it plainly, and the adapter around it."""

    label: str
    model: nn.Module  # the module whose weights train in the plain step
    plain_logits: Callable[[torch.Tensor], torch.Tensor]  # (batch, seq) ids -> (batch, seq, vocab)
    adapter: ModelAdapter
    site: str


def gru() -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(RecurrentConfig("gru", hidden_size=WIDTH, embedding_size=WIDTH)).eval()


def native_bridge() -> nn.Module:
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    config = TransformerBridgeConfig(
        d_model=WIDTH,
        d_head=WIDTH,
        n_heads=1,
        n_layers=2,
        n_ctx=N_CTX,
        d_vocab=VOCAB_SIZE,
        positional_embedding_type="rotary",
        act_fn="gelu",
        seed=0,
    )
    return TransformerBridge.boot_native(config, device="cpu").eval()


def save_gpt2(folder: Path) -> Path:
    """A random GPT-2-architecture model of the bridge's size, saved as a user's local checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=N_CTX, n_embd=WIDTH, n_layer=2, n_head=1, bos_token_id=None, eos_token_id=None
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def build_cases(folder: Path, example_tokens: torch.Tensor) -> list[Case]:
    from nnsight import NNsight, TransformersModel
    from transformer_lens import TransformerBridge

    recurrent = gru()
    bridge = native_bridge()
    gpt2_bridge = TransformerBridge.boot_transformers(str(folder), device="cpu").eval()
    nnsight_gru = NNsightAdapter(NNsight(gru()), example_inputs=torch.zeros(2, 7, dtype=torch.long))
    nnsight_gpt2 = NNsightAdapter(TransformersModel(str(folder), task="text-generation", dispatch=True))
    gpt2 = nnsight_gpt2.model.eval()  # the GPT2LMHeadModel that nnsight traces
    torch_gru = TorchModuleAdapter(recurrent, example_inputs=example_tokens)
    return [
        Case("TorchModuleAdapter, GRU", recurrent, recurrent, torch_gru, "rnn.h_l0"),
        Case("TorchModuleAdapter, GRU", recurrent, recurrent, torch_gru, "embedding"),
        Case("NNsightAdapter, NNsight(GRU)", nnsight_gru.model, nnsight_gru.model, nnsight_gru, "embedding.output"),
        Case("TransformerLensAdapter, boot_native", bridge, bridge, TransformerLensAdapter(bridge), "blocks.0.hook_resid_post"),
        Case("TransformerLensAdapter, GPT-2 folder", gpt2_bridge, gpt2_bridge, TransformerLensAdapter(gpt2_bridge), "blocks.0.hook_resid_post"),
        Case("NNsightAdapter, GPT-2 folder", gpt2, lambda tokens: gpt2(tokens).logits, nnsight_gpt2, "transformer.h.0.output"),
    ]


def compare(case: Case, pairs: CounterfactualPairs, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds of (plain step, MAS step), timed alternately."""
    alignment = ModelAlignment({"m": case.adapter}, case.site, SUBSPACE_DIM)
    source_hidden = alignment.source_activations("m", pairs.source_inputs, pairs.source_positions)
    parameters = list(case.model.parameters())

    def plain_step() -> None:
        for p in parameters:
            p.requires_grad_(True)
            p.grad = None
        intervention_loss(case.plain_logits(pairs.base_inputs), pairs.labels).backward()

    def mas_step() -> None:
        for p in parameters:
            p.requires_grad_(False)
        alignment.zero_grad(set_to_none=True)
        logits = alignment.intervened_logits("m", "m", source_hidden, pairs.base_inputs, pairs.base_positions)
        intervention_loss(logits, pairs.labels).backward()

    for _ in range(warmup):
        plain_step()
        mas_step()
    plain_times, mas_times = [], []
    for _ in range(repeats):
        for step, times in ((plain_step, plain_times), (mas_step, mas_times)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    for p in parameters:
        p.requires_grad_(False)
    return statistics.median(plain_times), statistics.median(mas_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see the module docstring)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # transformers' and TransformerLens's loading notices
    pairs = get_task("multi_object").counterfactual_pairs(128, seed=0)
    print(
        f"torch {torch.__version__}, {args.threads} threads, CPU; batch {len(pairs)}, seq "
        f"{pairs.base_inputs.shape[1]}, width {WIDTH}, k = {SUBSPACE_DIM}, median of {args.repeats}"
    )
    print(f"{'adapter, model':<38}{'site':<26}{'plain f+b':>11}{'MAS step':>11}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for case in build_cases(save_gpt2(Path(folder) / "gpt2"), pairs.base_inputs[:2]):
            plain, mas = compare(case, pairs, args.repeats)
            print(f"{case.label:<38}{case.site:<26}{plain * 1e3:9.1f}ms{mas * 1e3:9.1f}ms{mas / plain:7.2f}x")


if __name__ == "__main__":
    main()
