"""MAS across architectures and adapters: a GRU against a GPT-2-architecture model
trained on the same task, saved with save_pretrained and loaded back through
TransformerLens and through nnsight. The two adapters wrap the same weights, so MAS
must find the same IIA through either.

GPT-2's learned absolute position embeddings do not interpolate to counts it never
saw (held-out accuracy stays at 0 while training accuracy is perfect), so here the
pairs, the ceiling and the training check all use the training counts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from masalign import ModelAlignment, TorchModuleAdapter, evaluate, fit  # noqa: E402
from masalign.models import train_lm  # noqa: E402
from masalign.tasks import VOCAB_SIZE  # noqa: E402


@pytest.fixture(scope="module")
def gpt2_folder(small_task, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=48, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=3)
    model, summary = train_lm(small_task, seed=0, steps=1500, lr=3e-3, check_every=50, model=GPT2LMHeadModel(config), check_split="train")
    assert summary.check_trial_accuracy >= 0.98, summary
    folder = tmp_path_factory.mktemp("gpt2_counting")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def transformer_adapters(gpt2_folder):
    from transformer_lens import TransformerBridge
    from transformers import GPT2LMHeadModel

    from masalign.adapters import NNsightAdapter, TransformerLensAdapter

    bridge = TransformerBridge.boot_transformers(str(gpt2_folder), device="cpu")
    return {
        "transformer_lens": (TransformerLensAdapter(bridge, name="gpt2 (TL)"), "blocks.0.hook_resid_post"),
        "nnsight": (NNsightAdapter(GPT2LMHeadModel.from_pretrained(gpt2_folder).eval(), name="gpt2 (nnsight)"), "transformer.h.0.output"),
    }


def test_gru_to_transformer_mas_is_the_same_through_both_adapters(trained_grus, small_task, transformer_adapters) -> None:
    train = small_task.counterfactual_pairs(2000, seed=21, split="train")
    valid = small_task.counterfactual_pairs(200, seed=22, split="train")
    test = small_task.counterfactual_pairs(400, seed=23, split="train")
    ceiling = small_task.sample(300, seed=24, split="train")
    reports = {}
    for backend, (adapter, site) in transformer_adapters.items():
        models = {"gru": TorchModuleAdapter(trained_grus["A"], name="gru"), "gpt2": adapter}
        alignment = ModelAlignment(models, {"gru": "rnn.h_l0", "gpt2": site}, 4, seed=0)
        assert alignment.widths == {"gru": 48, "gpt2": 32}
        result = fit(alignment, train, valid, steps=120, lr=1e-2, eval_every=40, progress=False)
        assert result.history[-1]["valid_loss"] < result.history[0]["valid_loss"] - 0.5
        reports[backend] = evaluate(alignment, test, ceiling_data=ceiling)
    tl, ns = reports["transformer_lens"], reports["nnsight"]
    assert tl.ceiling["gpt2"] == ns.ceiling["gpt2"] >= 0.95
    for source in ("gru", "gpt2"):
        for target in ("gru", "gpt2"):
            assert abs(tl.iia[source][target] - ns.iia[source][target]) <= 0.03, (tl.table(), ns.table())
    # the GRU's own direction is learned whatever the partner is
    assert tl.iia["gru"]["gru"] >= tl.floor["gru"]["gru"] + 0.3, tl.table()
