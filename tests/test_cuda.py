"""The CUDA paths: each adapter on a GPU gives the CPU's numbers, fits train there, and
models on different devices, or one model sharded across devices, align exactly.

Every test compares a GPU computation with the same computation on the CPU (the
loss of an interchange and its gradients on every alignment parameter), so a
device mix-up shows as a wrong number, not only as an error. Skipped without CUDA.
``MASALIGN_TEST_DEVICE=cpu`` runs the same comparisons with the CPU in the GPU's
place (a check of the tests themselves on a machine without one).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import Tensor, nn

from masalign import CounterfactualPairs, ModelAlignment, TorchModuleAdapter, evaluate, fit, prefix_positions
from masalign.data import inputs_to
from masalign.models import RecurrentConfig, RecurrentLM
from masalign.objectives import intervention_loss

# TF32, on by default for cuDNN's RNNs and convolutions since Ampere, keeps 10 bits of
# mantissa (relative error ~1e-3): the comparisons with the CPU are made in full float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
GPU = torch.device(os.environ.get("MASALIGN_TEST_DEVICE", "cuda:0"))
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(GPU.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def loss_and_gradients(alignment: ModelAlignment, pairs: CounterfactualPairs, source: str, target: str) -> tuple[float, list[Tensor]]:
    """One direction's interchange loss and its gradients on every alignment parameter, on the CPU."""
    alignment.zero_grad(set_to_none=True)
    hidden = alignment.source_activations(source, pairs.source_inputs, pairs.source_positions)
    device = alignment.input_device(target)
    logits = alignment.intervened_logits(
        source, target, hidden, inputs_to(pairs.base_inputs, device), pairs.base_positions.to(device)
    )
    loss = intervention_loss(logits, pairs.labels.to(logits.device))
    loss.backward()
    gradients = [p.grad.detach().cpu() if p.grad is not None else torch.zeros(p.shape) for p in alignment.parameters()]
    return float(loss.detach()), gradients


def assert_same_step(on_cpu: ModelAlignment, elsewhere: ModelAlignment, pairs: CounterfactualPairs, directions, tolerance: float = 1e-4) -> None:
    """Same maps (copied from ``on_cpu``), same loss and gradients in every direction."""
    elsewhere.load_state_dict({k: v.to(elsewhere.state_dict()[k].device) for k, v in on_cpu.state_dict().items()})
    for source, target in directions:
        loss_cpu, grads_cpu = loss_and_gradients(on_cpu, pairs, source, target)
        loss_gpu, grads_gpu = loss_and_gradients(elsewhere, pairs, source, target)
        assert abs(loss_cpu - loss_gpu) <= tolerance * max(1.0, abs(loss_cpu)), (source, target, loss_cpu, loss_gpu)
        scale = max(float(g.abs().max()) for g in grads_cpu)
        assert scale > 0, "no gradient reached the maps"
        for g_cpu, g_gpu in zip(grads_cpu, grads_gpu, strict=True):
            assert (g_cpu - g_gpu).abs().max() <= tolerance * scale, (source, target)


def on(device: torch.device, model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(device)


@pytest.fixture(scope="module")
def pairs(small_task) -> dict[str, CounterfactualPairs]:
    return {
        "train": small_task.counterfactual_pairs(2000, seed=1),
        "valid": small_task.counterfactual_pairs(200, seed=2),
        "test": small_task.counterfactual_pairs(400, seed=3),
        "step": small_task.counterfactual_pairs(64, seed=5),
    }


def stepwise(pairs: CounterfactualPairs) -> CounterfactualPairs:
    """The same pairs under the stepwise protocol: the whole prefix up to each pair's position."""
    positions = prefix_positions(pairs.base_positions[:, 0])
    return CounterfactualPairs(pairs.base_inputs, pairs.source_inputs, positions, positions, pairs.labels)


# -- plain modules: the GRU's and LSTM's split recurrence (cuDNN forward and backward) --------


@pytest.mark.parametrize("architecture, site", [("gru", "rnn.h_l0"), ("lstm", "rnn.hc_l0")])
@pytest.mark.parametrize("protocol", ["single", "stepwise"])
def test_recurrent_models_on_the_gpu_give_the_cpu_numbers(trained_grus, pairs, architecture: str, site: str, protocol: str) -> None:
    if architecture == "gru":
        models = dict(trained_grus)
    else:
        torch.manual_seed(0)
        models = {name: RecurrentLM(RecurrentConfig("lstm", hidden_size=48, embedding_size=32)).eval() for name in "AB"}
    batch = pairs["step"] if protocol == "single" else stepwise(pairs["step"])
    on_cpu = ModelAlignment({n: TorchModuleAdapter(m, name=n) for n, m in models.items()}, site, 8, seed=0)
    on_gpu = ModelAlignment({n: TorchModuleAdapter(on(GPU, m), name=n) for n, m in models.items()}, site, 8, seed=0)
    assert all(a.device.type == GPU.type for a in on_gpu.alignments.values())
    assert_same_step(on_cpu, on_gpu, batch, [("A", "B"), ("B", "A"), ("A", "A")])


def test_a_fit_on_the_gpu_trains_and_its_save_loads_on_the_cpu(trained_grus, pairs, small_task, tmp_path) -> None:
    gpu_models = {n: TorchModuleAdapter(on(GPU, m), name=n) for n, m in trained_grus.items()}
    alignment = ModelAlignment(gpu_models, "rnn.h_l0", 8, seed=0)
    result = fit(alignment, pairs["train"], pairs["valid"], steps=150, lr=1e-2, eval_every=50, progress=False)
    assert result.steps > 0
    report = evaluate(alignment, pairs["test"])
    for source in "AB":
        for target in "AB":
            assert report.iia[source][target] >= report.floor[source][target] + 0.3, report.table()
    alignment.save(tmp_path / "saved")
    cpu_models = {n: TorchModuleAdapter(m, name=n) for n, m in trained_grus.items()}
    loaded = ModelAlignment.load(tmp_path / "saved", cpu_models)
    for name in "AB":
        assert loaded.alignments[name].device == CPU
        for key, value in alignment.alignments[name].state_dict().items():
            assert torch.equal(loaded.alignments[name].state_dict()[key], value.cpu()), key
    on_cpu = evaluate(loaded, pairs["test"])
    for source in "AB":
        for target in "AB":
            assert abs(on_cpu.iia[source][target] - report.iia[source][target]) <= 0.01, (on_cpu.table(), report.table())


def test_models_on_different_devices_align_as_on_one(trained_grus, pairs) -> None:
    """Model A on the CPU, B on the GPU: each map lives with its model, coordinates cross over."""
    on_cpu = ModelAlignment({n: TorchModuleAdapter(m, name=n) for n, m in trained_grus.items()}, "rnn.h_l0", 8, seed=0)
    mixed_models = {"A": TorchModuleAdapter(trained_grus["A"], name="A"), "B": TorchModuleAdapter(on(GPU, trained_grus["B"]), name="B")}
    mixed = ModelAlignment(mixed_models, "rnn.h_l0", 8, seed=0)
    assert mixed.alignments["A"].device == CPU and mixed.alignments["B"].device.type == GPU.type
    assert_same_step(on_cpu, mixed, pairs["step"], [("A", "B"), ("B", "A"), ("B", "B")])
    result = fit(mixed, pairs["train"], pairs["valid"], steps=60, lr=1e-2, eval_every=30, progress=False)
    assert result.best_valid_accuracy is not None
    assert mixed.alignments["A"].device == CPU and mixed.alignments["B"].device.type == GPU.type


# -- TransformerLens and nnsight models --------------------------------------------------------


@pytest.mark.parametrize("site", ["blocks.0.hook_resid_post", "hook_embed"])
def test_a_transformer_lens_model_on_the_gpu_gives_the_cpu_numbers(pairs, site: str) -> None:
    from masalign import TransformerLensAdapter

    from transformer_fixtures import tiny_tl_transformer

    def models(device: torch.device) -> dict[str, TransformerLensAdapter]:  # seeded: the same weights each time
        built = {name: tiny_tl_transformer(d_vocab=8, seed=seed, d_model=32).eval() for name, seed in (("A", 0), ("B", 1))}
        return {name: TransformerLensAdapter(model.to(device), name=name) for name, model in built.items()}

    batch = pairs["step"] if site != "hook_embed" else stepwise(pairs["step"])
    on_cpu = ModelAlignment(models(CPU), site, 4, seed=0)
    on_gpu = ModelAlignment(models(GPU), site, 4, seed=0)
    assert all(a.device.type == GPU.type for a in on_gpu.alignments.values())
    assert_same_step(on_cpu, on_gpu, batch, [("A", "B"), ("B", "A")])


def _tiny_gpt2(seed: int = 0, n_layer: int = 3) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=16, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False,
    )
    return GPT2LMHeadModel(config).eval()


def test_an_nnsight_model_on_the_gpu_gives_the_cpu_numbers_and_trains_from_cached_keys(pairs) -> None:
    from masalign import NNsightAdapter

    site = "transformer.h.1.output"
    model = _tiny_gpt2()
    on_cpu = ModelAlignment({"M": NNsightAdapter(model, name="M")}, site, 4, seed=0)
    on_gpu = ModelAlignment({"M": NNsightAdapter(_tiny_gpt2().to(GPU), name="M")}, site, 4, seed=0)
    assert on_gpu.alignments["M"].device.type == GPU.type
    assert_same_step(on_cpu, on_gpu, pairs["step"], [("M", "M")])
    # fit caches the later blocks' keys and values before the first written position (on the CPU) and
    # moves each step's rows to the GPU; the model is random, so only that it runs and stays finite.
    result = fit(on_gpu, pairs["train"].subset(slice(0, 512)), pairs["valid"], steps=20, lr=1e-2, eval_every=10, progress=False)
    assert result.steps > 0 and all(torch.isfinite(p).all() for p in on_gpu.parameters())


@pytest.mark.parametrize("backend", ["nnsight", "transformer_lens"])
def test_a_model_on_the_gpu_reads_shared_prompt_prefixes_as_the_cpu_reads_whole_prompts(pairs, backend: str, tmp_path) -> None:
    from masalign import NNsightAdapter, TransformerLensAdapter

    if backend == "nnsight":
        site = "transformer.h.1.output"
        on_cpu, on_gpu = NNsightAdapter(_tiny_gpt2(), name="M"), NNsightAdapter(_tiny_gpt2().to(GPU), name="M")
    else:  # a TransformerBridge over the same GPT-2, booted from a folder as users boot one
        from transformer_lens import TransformerBridge

        from transformer_fixtures import save_tiny_gpt2

        site = "blocks.1.hook_resid_post"
        save_tiny_gpt2(tmp_path, vocab_size=16)  # for its tokenizer; the model is written over it
        _tiny_gpt2().save_pretrained(tmp_path)
        on_cpu, on_gpu = (
            TransformerLensAdapter(TransformerBridge.boot_transformers(str(tmp_path), device=str(device)).eval(), name="M")
            for device in (CPU, GPU)
        )
        assert on_gpu.supports_key_values(site)
    # The task's prompts share their beginnings: read in segments on the GPU (the cuts given, as
    # the plan for a GPU cuts less often), in one run on the CPU.
    batch = pairs["train"].subset(slice(0, 256))
    tokens = batch.base_inputs if isinstance(batch.base_inputs, Tensor) else batch.base_inputs["input_ids"]
    seq, start = tokens.shape[1], int(batch.base_positions[batch.base_positions >= 0].min())
    cuts = [0, seq // 3, 2 * seq // 3, seq]
    with torch.no_grad():
        plain = on_cpu.key_value_prefix(batch.base_inputs, site, start, cuts=[0, seq])
        shared = on_gpu.key_value_prefix(inputs_to(batch.base_inputs, GPU), site, start, cuts=cuts)
        assert shared.states.device.type == GPU.type
        for ours, theirs in zip(shared.tensors(), plain.tensors(), strict=True):
            assert (ours.cpu() - theirs).abs().max() <= 1e-4 * max(1.0, float(theirs.abs().max()))
        read_end = int(batch.source_positions.max()) + 1
        source_cuts = [0, read_end // 2, read_end]
        plain = on_cpu.activations(batch.source_inputs, site, batch.source_positions)
        shared = on_gpu.key_value_activations(inputs_to(batch.source_inputs, GPU), site, batch.source_positions.to(GPU), cuts=source_cuts)
        assert (shared.cpu() - plain).abs().max() <= 1e-4 * max(1.0, float(plain.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_keeps_float32_maps_and_trains(pairs, dtype: torch.dtype) -> None:
    from masalign import NNsightAdapter

    site = "transformer.h.1.output"
    full = ModelAlignment({"M": NNsightAdapter(_tiny_gpt2().to(GPU), name="M")}, site, 4, seed=0)
    half = ModelAlignment({"M": NNsightAdapter(_tiny_gpt2().to(GPU, dtype), name="M")}, site, 4, seed=0)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    loss_full, grads_full = loss_and_gradients(full, pairs["step"], "M", "M")
    loss_half, grads_half = loss_and_gradients(half, pairs["step"], "M", "M")
    assert abs(loss_full - loss_half) < 0.05 * abs(loss_full)
    for g_full, g_half in zip(grads_full, grads_half, strict=True):
        assert torch.isfinite(g_half).all() and g_half.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(g_full.flatten(), g_half.flatten(), dim=0) > 0.95
    fit(half, pairs["train"].subset(slice(0, 512)), pairs["valid"], steps=10, lr=1e-2, eval_every=5, progress=False)
    assert all(torch.isfinite(p).all() for p in half.parameters())


# -- one model sharded across devices (device_map) -------------------------------------------


def _sharded_gpt2(offload: bool) -> nn.Module:
    """The 3-block GPT-2 dispatched by accelerate, as ``from_pretrained(device_map=...)`` does: its
    embeddings and block 0 on the GPU, blocks 1-2 and the head on the CPU, where they run
    (``offload=False``), or from where they are brought to the GPU for each call (CPU offload:
    their parameters show as on the meta device)."""
    from accelerate import dispatch_model

    gpu = GPU.index if GPU.type == "cuda" else str(GPU)
    device_map = {
        "transformer.wte": gpu, "transformer.wpe": gpu, "transformer.drop": gpu, "transformer.h.0": gpu,
        "transformer.h.1": "cpu", "transformer.h.2": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu",
    }
    return dispatch_model(_tiny_gpt2(), device_map=device_map, main_device=None if offload else "cpu")


@pytest.mark.parametrize("offload", [False, True], ids=["split", "cpu-offload"])
def test_a_model_sharded_across_devices_aligns_as_the_whole_model(pairs, offload: bool) -> None:
    from masalign import NNsightAdapter

    whole = _tiny_gpt2()
    sharded = _sharded_gpt2(offload)
    later_blocks = GPU.type if offload else "cpu"  # where blocks 1-2 compute
    assert {p.device.type for p in sharded.parameters()} == ({GPU.type, "meta"} if offload and GPU.type == "cuda" else {GPU.type, "cpu"})
    for layer, device_type in ((0, GPU.type), (2, later_blocks)):
        site = f"transformer.h.{layer}.output"
        spread = ModelAlignment({"S": NNsightAdapter(sharded, name="S")}, site, 4, seed=0)
        assert spread.site_device("S").type == device_type and spread.alignments["S"].device.type == device_type
        on_cpu = ModelAlignment({"S": NNsightAdapter(whole, name="S")}, site, 4, seed=0)
        assert_same_step(on_cpu, spread, pairs["step"], [("S", "S")])
    # MAS between the sharded model and a whole copy on the CPU, and a fit.
    sites = {"W": "transformer.h.2.output", "S": "transformer.h.0.output"}
    both = ModelAlignment({"W": NNsightAdapter(whole, name="W"), "S": NNsightAdapter(sharded, name="S")}, sites, 4, seed=0)
    both_on_cpu = ModelAlignment({"W": NNsightAdapter(whole, name="W"), "S": NNsightAdapter(_tiny_gpt2(), name="S")}, sites, 4, seed=0)
    assert_same_step(both_on_cpu, both, pairs["step"], [("W", "S"), ("S", "W")])
    result = fit(both, pairs["train"].subset(slice(0, 256)), pairs["valid"], steps=10, lr=1e-2, eval_every=5, progress=False)
    assert result.steps > 0 and all(torch.isfinite(p).all() for p in both.parameters())
    assert both.alignments["S"].device.type == GPU.type and both.alignments["W"].device == CPU


def test_a_two_layer_rnn_with_dropout_differentiates_on_the_gpu_in_eval_mode(pairs) -> None:
    """cuDNN cannot differentiate an RNN in eval mode, and training mode would drop out between
    its layers: such an RNN runs without cuDNN, and gives the CPU's numbers."""
    torch.manual_seed(0)
    model = RecurrentLM(RecurrentConfig("gru", hidden_size=32, embedding_size=16, num_layers=2)).eval()
    model.rnn.dropout = 0.5
    on_cpu = ModelAlignment({"M": TorchModuleAdapter(model, name="M")}, "rnn.h_l1", 4, seed=0)
    on_gpu = ModelAlignment({"M": TorchModuleAdapter(on(GPU, model), name="M")}, "rnn.h_l1", 4, seed=0)
    assert_same_step(on_cpu, on_gpu, pairs["step"], [("M", "M")])
    assert not on_gpu.models["M"].model.rnn.training


def test_a_model_moved_after_its_alignment_was_built_takes_its_map_along_in_fit(trained_grus, pairs) -> None:
    models = {n: TorchModuleAdapter(on(CPU, m), name=n) for n, m in trained_grus.items()}
    alignment = ModelAlignment(models, "rnn.h_l0", 8, seed=0)
    for adapter in models.values():
        adapter.model.to(GPU)
    fit(alignment, pairs["train"], pairs["valid"], steps=20, lr=1e-2, eval_every=10, progress=False)
    assert all(a.device.type == GPU.type for a in alignment.alignments.values())
    assert all(torch.isfinite(p).all() for p in alignment.parameters())
