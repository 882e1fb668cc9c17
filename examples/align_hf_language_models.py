"""Align two Hugging Face causal language models, one through TransformerLens and one through nnsight.

The question: do two language models, of different widths and depths, trained
from different seeds on differently worded prompts, carry "the value bound to
the queried name" in a shared causal subspace? MAS fits one rotation per model
so that swapping that subspace from one model's run into the other's changes the
other's answer exactly as the task's causal model says.

The task (variable binding), worded two ways::

    model tl_w64      (n_embd 64, 2 layers):  a = 3 , b = 5 , c = 1 ; b       -> 5
    model nnsight_w96 (n_embd 96, 3 layers):  <s> a is 3 , b is 5 , c is 1 . b -> 5

Each model predicts the answer at the last position, the queried name. Causal
model: ``answer = values[query]``. Interchange on ``queried_value``: the source
prompt's queried value replaces the base prompt's; the base's answer becomes
the source's. Where that variable lives is itself a finding: at the queried
name's token after the first block (the sites below) both models carry it, with
IIA near 1; at the value's own token after the first block the IIA is 0 (seen
in a quick run): by then the first block's attention has carried the value to
the query, and the later blocks no longer read it where it was written.
The two wordings differ in length and give the digits different token ids, so
the counterfactual data is one view per model, row for row.

Steps:

1. Stand-in for the hub: build both GPT-2-architecture models from configs,
   train each briefly, and ``save_pretrained`` them to local folders, each with
   a word-level vocabulary JSON (no tokenizer files).
2. As a user with pretrained models: load one with
   ``TransformerBridge.boot_transformers(folder)`` and the other with nnsight's
   ``TransformersModel(folder, task="text-generation", dispatch=True)``, wrap
   them in ``TransformerLensAdapter`` and ``NNsightAdapter``, build the
   counterfactual views, fit, and print the IIA matrix with ceiling and floor.

Run: ``python examples/align_hf_language_models.py --out runs/hf_example [--quick]``
(about a minute on one CPU core; ``--quick`` is the reduced size the tests run).
"""

from __future__ import annotations

import os

# Nothing is downloaded: set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from masalign import IGNORE_INDEX, CounterfactualPairs, IIAReport, LabelledSequences, ModelAlignment, evaluate, fit  # noqa: E402
from masalign.adapters import NNsightAdapter, TransformerLensAdapter  # noqa: E402

NAMES = ("a", "b", "c")
DIGITS = tuple(str(value) for value in range(10))
VARIABLE = "queried_value"


# -- the task and its causal model ------------------------------------------------------------


@dataclass(frozen=True)
class Bindings:
    """One prompt: ``values[i]`` is bound to ``NAMES[i]``, and name ``query`` is asked for."""

    values: tuple[int, ...]
    query: int

    @property
    def answer(self) -> int:
        """The causal model: the value bound to the queried name."""
        return self.values[self.query]


@dataclass(frozen=True)
class PromptFormat:
    """How one model's prompts are worded: ``prefix``, then per binding ``name <link> value``
    joined by ``separator``, then ``before_query`` and the queried name."""

    prefix: tuple[str, ...]
    link: str
    separator: str
    before_query: str

    def words(self, bindings: Bindings) -> list[str]:
        words = list(self.prefix)
        for index, (name, value) in enumerate(zip(NAMES, bindings.values)):
            if index:
                words.append(self.separator)
            words += [name, self.link, DIGITS[value]]
        return words + [self.before_query, NAMES[bindings.query]]

    def value_position(self, bindings: Bindings) -> int:
        """Token position of the queried name's value (digits appear only as values, in name order)."""
        digit_positions = [p for p, word in enumerate(self.words(bindings)) if word in DIGITS]
        return digit_positions[bindings.query]

    def vocabulary(self) -> dict[str, int]:
        """Word -> token id; the order differs between formats, so the digits' ids do too."""
        words = [*self.prefix, self.link, self.separator, self.before_query, *NAMES, *DIGITS]
        return {word: index for index, word in enumerate(dict.fromkeys(words))}


FORMAT_A = PromptFormat(prefix=(), link="=", separator=",", before_query=";")
FORMAT_B = PromptFormat(prefix=("<s>",), link="is", separator=",", before_query=".")


def sample_bindings(n: int, rng: random.Random) -> list[Bindings]:
    return [Bindings(tuple(rng.randrange(len(DIGITS)) for _ in NAMES), rng.randrange(len(NAMES))) for _ in range(n)]


def sample_interchange(n: int, rng: random.Random) -> tuple[list[Bindings], list[Bindings]]:
    """``n`` (base, source) prompt pairs whose answers differ, so that chance agreement cannot pass for IIA."""
    bases, sources = [], []
    while len(bases) < n:
        base, source = sample_bindings(2, rng)
        if base.answer != source.answer:
            bases.append(base)
            sources.append(source)
    return bases, sources


def encode(prompts: Sequence[Bindings], prompt_format: PromptFormat, vocabulary: dict[str, int]) -> Tensor:
    """``(N, T)`` token ids; every prompt of a format has the same length, so there is no padding."""
    return torch.tensor([[vocabulary[word] for word in prompt_format.words(p)] for p in prompts])


def answer_labels(answers: Sequence[int], seq_len: int, vocabulary: dict[str, int]) -> Tensor:
    """``(N, T)`` next-token labels: the answer's id at the last position, ``IGNORE_INDEX`` elsewhere."""
    labels = torch.full((len(answers), seq_len), IGNORE_INDEX)
    labels[:, -1] = torch.tensor([vocabulary[DIGITS[answer]] for answer in answers])
    return labels


def task_data(prompts: Sequence[Bindings], prompt_format: PromptFormat, vocabulary: dict[str, int]) -> LabelledSequences:
    """The plain prompts with their answers: training data, and the ceiling (task accuracy)."""
    tokens = encode(prompts, prompt_format, vocabulary)
    return LabelledSequences(tokens, answer_labels([p.answer for p in prompts], tokens.shape[1], vocabulary))


def counterfactual_view(
    bases: Sequence[Bindings],
    sources: Sequence[Bindings],
    prompt_format: PromptFormat,
    vocabulary: dict[str, int],
    at: str = "query",
) -> CounterfactualPairs:
    """The interchange pairs as one model sees them: its wording, its positions, its token ids.

    Row ``i`` is the same (base, source) pair in every model's view; the label,
    at the last position, is the causal model's counterfactual answer: the
    source's queried value. The site is read and written at ``at``: ``"query"``,
    the queried name, the last token (position 12 in format A, 13 in format B);
    or ``"value"``, the queried value's own token (it differs per prompt: 2, 6 or
    10 in A; 3, 7 or 11 in B).
    """
    base_inputs = encode(bases, prompt_format, vocabulary)
    source_inputs = encode(sources, prompt_format, vocabulary)
    if at == "query":
        base_positions = torch.full((len(bases), 1), base_inputs.shape[1] - 1)
        source_positions = torch.full((len(sources), 1), source_inputs.shape[1] - 1)
    elif at == "value":
        base_positions = torch.tensor([[prompt_format.value_position(b)] for b in bases])
        source_positions = torch.tensor([[prompt_format.value_position(s)] for s in sources])
    else:
        raise ValueError(f"at must be 'query' or 'value', got {at!r}")
    return CounterfactualPairs(
        base_inputs=base_inputs,
        source_inputs=source_inputs,
        base_positions=base_positions,
        source_positions=source_positions,
        labels=answer_labels([s.answer for s in sources], base_inputs.shape[1], vocabulary),
        variable=VARIABLE,
    )


# -- step 1: stand-ins for pretrained checkpoints ------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A model to build, train and save: its wording, its size and its seed."""

    name: str
    prompt_format: PromptFormat
    n_embd: int
    n_layer: int
    seed: int


CHECKPOINTS = (
    Checkpoint("tl_w64", FORMAT_A, n_embd=64, n_layer=2, seed=0),
    Checkpoint("nnsight_w96", FORMAT_B, n_embd=96, n_layer=3, seed=1),
)


def accuracy(logits_of: Callable[[Tensor], Tensor], data: LabelledSequences) -> float:
    """Fraction of prompts whose answer is the argmax at the last position."""
    with torch.no_grad():
        predicted = logits_of(data.inputs)[:, -1].argmax(-1)
    return float((predicted == data.labels[:, -1]).float().mean())


def train_checkpoint(checkpoint: Checkpoint, folder: Path, max_steps: int, batch_size: int = 64) -> tuple[float, int]:
    """Train a fresh GPT-2-architecture model on the task and save it to ``folder``.

    Stops once 99.5% of 512 held-out prompts are right (checked every 25 steps).
    Returns (that accuracy, the number of steps).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    vocabulary = checkpoint.prompt_format.vocabulary()
    torch.manual_seed(checkpoint.seed)
    config = GPT2Config(
        vocab_size=len(vocabulary),
        n_positions=32,
        n_embd=checkpoint.n_embd,
        n_layer=checkpoint.n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # a word-level vocabulary has no GPT-2 specials
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = random.Random(checkpoint.seed)
    held_out = task_data(sample_bindings(512, random.Random(10_000 + checkpoint.seed)), checkpoint.prompt_format, vocabulary)
    held_out_accuracy = 0.0
    for step in range(1, max_steps + 1):
        batch = task_data(sample_bindings(batch_size, rng), checkpoint.prompt_format, vocabulary)
        logits = model(batch.inputs).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == max_steps:
            model.eval()
            held_out_accuracy = accuracy(lambda tokens: model(tokens).logits, held_out)
            model.train()
            if held_out_accuracy >= 0.995:
                break
    model.eval().save_pretrained(folder)
    (folder / "word_vocabulary.json").write_text(json.dumps(vocabulary, indent=1))
    return held_out_accuracy, step


# -- step 2: the alignment, as a user with two local checkpoints --------------------------------


def load_vocabulary(folder: Path) -> dict[str, int]:
    return json.loads((folder / "word_vocabulary.json").read_text())


def load_adapters(folders: dict[str, Path]) -> dict[str, TransformerLensAdapter | NNsightAdapter]:
    """The first checkpoint through TransformerLens, the second through nnsight, by folder."""
    from nnsight import TransformersModel
    from transformer_lens import TransformerBridge

    name_a, name_b = (checkpoint.name for checkpoint in CHECKPOINTS)
    bridge = TransformerBridge.boot_transformers(str(folders[name_a]), device="cpu").eval()
    # task= because transformers cannot infer the pipeline task offline; dispatch=True
    # loads the weights now (a lazy build would look for a tokenizer to guess shapes).
    language_model = TransformersModel(str(folders[name_b]), task="text-generation", dispatch=True)
    return {
        name_a: TransformerLensAdapter(bridge, name=name_a),
        name_b: NNsightAdapter(language_model, name=name_b),
    }


SITES = {
    "tl_w64": "blocks.0.hook_resid_post",  # residual stream after block 0 (TransformerLens hook name)
    "nnsight_w96": "transformer.h.0.output",  # residual stream after block 0 (module path)
}


def main(out_dir: str | Path, quick: bool = False) -> IIAReport:
    """Train and save the two checkpoints under ``out_dir``, load them back, align them, report.

    Returns the :class:`IIAReport` of the alignment at the query token; its
    ``extra`` holds each checkpoint's accuracy after training, the fit summary,
    the wall time and, in a full run, the IIA matrix at the value's own token.
    Writes ``report.json``, ``iia.png`` and the alignment into ``out_dir``.
    """
    # Models this small run fastest on one thread; on a busy machine a second one
    # only adds waiting at every operation (measured: 6 ms against 400 ms a forward).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), quick)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir: Path, quick: bool) -> IIAReport:
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = dict(train_steps=600, train=1024, valid=128, test=256, fit_steps=200) if quick else dict(
        train_steps=2000, train=4096, valid=256, test=1024, fit_steps=600
    )

    print("1. training the stand-in checkpoints")
    folders, trained_accuracy = {}, {}
    for checkpoint in CHECKPOINTS:
        folders[checkpoint.name] = out_dir / checkpoint.name
        trained_accuracy[checkpoint.name], steps = train_checkpoint(checkpoint, folders[checkpoint.name], sizes["train_steps"])
        print(
            f"   {checkpoint.name}: n_embd {checkpoint.n_embd}, {checkpoint.n_layer} layers, seed {checkpoint.seed}: "
            f"held-out accuracy {trained_accuracy[checkpoint.name]:.3f} after {steps} steps -> {folders[checkpoint.name]}"
        )

    print("2. loading them back and aligning them at", SITES)
    adapters = load_adapters(folders)
    formats = {checkpoint.name: checkpoint.prompt_format for checkpoint in CHECKPOINTS}
    vocabularies = {name: load_vocabulary(folder) for name, folder in folders.items()}
    ceiling_prompts = sample_bindings(sizes["test"], random.Random(4))
    ceiling = {name: task_data(ceiling_prompts, formats[name], vocabularies[name]) for name in adapters}

    def align_at(at: str) -> tuple[ModelAlignment, IIAReport]:
        """Fit and evaluate an alignment whose sites are read and written at token ``at``."""

        def views(n: int, seed: int) -> dict[str, CounterfactualPairs]:
            bases, sources = sample_interchange(n, random.Random(seed))
            return {name: counterfactual_view(bases, sources, formats[name], vocabularies[name], at) for name in adapters}

        train, valid, test = views(sizes["train"], 1), views(sizes["valid"], 2), views(sizes["test"], 3)
        alignment = ModelAlignment(adapters, SITES, subspace_dim={VARIABLE: 8}, seed=0)
        result = fit(alignment, train, valid, steps=sizes["fit_steps"], batch_size=64, lr=1e-2, eval_every=25, progress=False)
        report = evaluate(alignment, test, ceiling_data=ceiling)
        report.extra["fit"] = result.summary()
        print(f"   at the {at} token: fit stopped ({result.stop_reason}) after {result.steps} steps, {result.seconds:.0f} s")
        print("   " + report.table().replace("\n", "\n   "))
        return alignment, report

    alignment, report = align_at("query")
    alignment.save(out_dir / "alignment", overwrite=True)  # the checkpoints above are rewritten too
    if not quick:
        # The contrast that locates the variable: the same sites, at the value's own token.
        report.extra["iia_at_value_token"] = align_at("value")[1].iia
    report.extra.update(trained_accuracy=trained_accuracy, seconds=time.perf_counter() - start)
    report.save_json(out_dir / "report.json")
    report.plot(out_dir / "iia.png")
    print(f"wall time {report.extra['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Align two local Hugging Face language models with MAS.")
    parser.add_argument("--out", default="runs/hf_example", help="folder for the checkpoints, the alignment and the report")
    parser.add_argument("--quick", action="store_true", help="a reduced run (about a minute), as in the tests")
    args = parser.parse_args()
    main(args.out, quick=args.quick)
