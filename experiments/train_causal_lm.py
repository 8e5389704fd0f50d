"""A small Hugging Face causal LM trained twice from one init: native, and converted by manualbp.

    python -m experiments.train_causal_lm                 # 300 steps, writes experiments/results/
    python -m experiments.train_causal_lm --steps 20 --out /tmp/lm   # a quick look

The model is a `transformers.LlamaForCausalLM` built from a small config with random weights
(nothing is downloaded). A deep copy of it is converted by `mbp.convert`, which turns every
`LlamaMLP` — down(silu(gate(x)) ⊙ up(x)) — into one `mbp.GatedMLP` holding the same Parameters,
and its loss goes through the fused head `mbp.functional.linear_cross_entropy` on the decoder's last hidden
state and `lm_head.weight`, so the (tokens × vocab) logits are never kept for backward:

    native:    logits = lm_head(decoder(ids));  loss = CE(logits[:, :-1], ids[:, 1:])
    manualbp:  loss = linear_cross_entropy(decoder(ids)[:, :-1], lm_head.weight, ids[:, 1:])

Both are trained on the same batches with the same AdamW settings. The tokens come from a
random sparse bigram language made on the fly (each token has four possible successors with
probabilities 0.55 / 0.25 / 0.12 / 0.08), so the loss has a known floor: the chain's entropy rate
(the entropy of those four probabilities).

Writes ``<out>.png`` (both loss curves and their difference) and ``<out>.md``: the command, date,
config, the saved-activation bytes of one training forward of each model (every tensor autograd
saves, parameters and the input ids excluded; `manualbp.ops.network.saved_tensor_bytes`), and
the loss at a few steps. Runs on one CPU thread in float32.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

import manualbp as mbp
from manualbp.ops.network import saved_tensor_bytes

RESULTS = Path(__file__).resolve().parent / "results"
SUCCESSOR_PROBS = (0.55, 0.25, 0.12, 0.08)


@dataclass
class Config:
    vocab: int = 2048
    hidden: int = 64
    intermediate: int = 176
    layers: int = 2
    heads: int = 4
    batch: int = 16
    seq: int = 64
    steps: int = 300
    lr: float = 3e-3
    seed: int = 0


def build_model(cfg: Config) -> nn.Module:
    """A LLaMA causal LM from a small config, random init (seeded), float32."""
    torch.manual_seed(cfg.seed)
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).float()


class BigramLanguage:
    """Tokens from a fixed random sparse bigram chain: token t is followed by one of four
    successors drawn once per token, with probabilities SUCCESSOR_PROBS."""

    def __init__(self, vocab: int, gen: torch.Generator) -> None:
        self.successors = torch.stack([torch.randperm(vocab, generator=gen)[:4] for _ in range(vocab)])
        self.probs = torch.tensor(SUCCESSOR_PROBS)
        self.vocab = vocab

    def sample(self, batch: int, seq: int, gen: torch.Generator) -> Tensor:
        ids = torch.empty(batch, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, self.vocab, (batch,), generator=gen)
        for t in range(1, seq):
            pick = torch.multinomial(self.probs.expand(batch, 4), 1, generator=gen).squeeze(1)
            ids[:, t] = self.successors[ids[:, t - 1], pick]
        return ids

    def entropy_rate(self) -> float:
        """Nats per next token once the previous token is known (the floor of the training loss,
        up to the first token of each sequence). Successors of one token are distinct, so this is
        the entropy of SUCCESSOR_PROBS."""
        return -sum(p * math.log(p) for p in SUCCESSOR_PROBS)


def native_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token cross entropy on the model's own logits (mean over the predicted tokens)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def fused_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """The same loss through manualbp's fused head: the decoder's last hidden state, then
    linear + cross-entropy chunk by chunk, with no logits kept for backward."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.lm_head
    return mbp.functional.linear_cross_entropy(
        hidden[:, :-1].flatten(0, 1), head.weight, head.bias, ids[:, 1:].flatten()
    )


def convert(model: nn.Module) -> mbp.ConversionReport:
    report = mbp.convert(model)
    gated = [m for m in model.modules() if isinstance(m, mbp.GatedMLP)]
    if len(gated) != len(model.model.layers):
        raise RuntimeError(f"expected every LlamaMLP to become a GatedMLP; report:\n{report}")
    return report


def activation_bytes(model: nn.Module, loss_fn: Callable[[nn.Module, Tensor], Tensor], ids: Tensor) -> int:
    """Bytes autograd saves for backward in one training forward (parameters and ids excluded)."""
    return saved_tensor_bytes(lambda: loss_fn(model, ids), [ids, *model.parameters()]).total


@dataclass
class Run:
    losses: list[float]
    seconds: float


def train(model: nn.Module, loss_fn: Callable[[nn.Module, Tensor], Tensor], batches: list[Tensor],
          lr: float) -> Run:  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for ids in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return Run(losses, time.perf_counter() - start)


def plot(path: Path, native: Run, ours: Run, floor: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(native.losses) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    top.plot(steps, native.losses, label="native (HF LlamaForCausalLM)", lw=2, alpha=0.7)
    top.plot(steps, ours.losses, label="manualbp (GatedMLP + fused head)", lw=1, ls="--")
    top.axhline(floor, color="grey", lw=0.8, ls=":", label=f"entropy rate {floor:.3f}")
    top.set_ylabel("train loss (nats)")
    top.legend()
    bottom.plot(steps, [a - b for a, b in zip(ours.losses, native.losses, strict=True)], lw=1)
    bottom.set_ylabel("manualbp − native")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cfg: Config, argv: list[str], native: Run, ours: Run, memory: dict[str, int],
           floor: float, conversion: mbp.ConversionReport) -> str:  # fmt: skip
    native_bytes = memory["native"]
    memory_rows = "\n".join(f"| {k} | {v:,} | {v / native_bytes:.2f} |" for k, v in memory.items())
    marks = sorted({0, len(native.losses) // 4, len(native.losses) // 2, len(native.losses) - 1})
    rows = "\n".join(
        f"| {i + 1} | {a:.4f} | {b:.4f} | {b - a:+.2e} |"
        for i, a, b in ((i, native.losses[i], ours.losses[i]) for i in marks)
    )
    diff = max(abs(a - b) for a, b in zip(ours.losses, native.losses, strict=True))
    gated = sum(1 for line in conversion.replaced if line.new.startswith("manualbp.GatedMLP"))
    return f"""# A Hugging Face causal LM: native vs manualbp (GatedMLP + fused head)

    python -m experiments.train_causal_lm {" ".join(argv)}

Run {datetime.date.today().isoformat()} on {platform.machine()}, Python {platform.python_version()},
torch {torch.__version__}, transformers {transformers.__version__}, one CPU thread, float32.
`LlamaForCausalLM`: vocab {cfg.vocab}, hidden {cfg.hidden}, intermediate {cfg.intermediate},
{cfg.layers} layers, {cfg.heads} heads; random init (seed {cfg.seed}); batches of {cfg.batch} × {cfg.seq}
tokens of a random sparse bigram language (entropy rate {floor:.4f} nats); AdamW lr {cfg.lr},
{cfg.steps} steps.
`mbp.convert` made {gated} `GatedMLP`s (one per decoder layer); the loss of the converted model is
`mbp.functional.linear_cross_entropy` on the last hidden state and `lm_head.weight`.

## Saved-activation memory of one training forward

| model | bytes saved for backward | ratio |
| --- | --- | --- |
{memory_rows}

(every tensor autograd saves, counted once per storage; parameters and the input ids excluded.
The native model keeps the {cfg.batch}×{cfg.seq}×{cfg.vocab} logits and their log-softmax; the fused
head keeps x and precomputed gradients the size of x and W instead.)

## Loss

| step | native | manualbp | difference |
| --- | --- | --- | --- |
{rows}

Largest |manualbp − native| over the run: {diff:.2e} (float32 rounding, which compounds over the
steps: both start from the same weights and see the same batches). Wall time of the training
loop (same process, one after the other, for scale only): native {native.seconds:.1f} s,
manualbp {ours.seconds:.1f} s.

![loss curves](causal_lm.png)
"""


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Config()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=RESULTS / "causal_lm",
                        help="output path without suffix: writes <out>.png and <out>.md")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = Config(**{k: getattr(args, k) for k in vars(defaults)})
    torch.set_num_threads(1)

    native = build_model(cfg)
    ours = copy.deepcopy(native)
    conversion = convert(ours)

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    language = BigramLanguage(cfg.vocab, gen)
    batches = [language.sample(cfg.batch, cfg.seq, gen) for _ in range(cfg.steps)]
    memory = {
        "native": activation_bytes(native, native_loss, batches[0]),
        "GatedMLP only (native head)": activation_bytes(ours, native_loss, batches[0]),
        "fused head only (native MLPs)": activation_bytes(native, fused_loss, batches[0]),
        "manualbp (GatedMLP + fused head)": activation_bytes(ours, fused_loss, batches[0]),
    }

    native_run = train(native, native_loss, batches, cfg.lr)
    our_run = train(ours, fused_loss, batches, cfg.lr)
    floor = language.entropy_rate()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(args.out.with_suffix(".png"), native_run, our_run, floor)
    args.out.with_suffix(".md").write_text(report(cfg, argv, native_run, our_run, memory, floor, conversion))
    print(f"loss: native {native_run.losses[-1]:.4f}, manualbp {our_run.losses[-1]:.4f} "
          f"(floor {floor:.4f}); saved bytes: native {memory['native']:,}, "
          f"manualbp {memory['manualbp (GatedMLP + fused head)']:,}; "
          f"wrote {args.out}.png/.md")  # fmt: skip
    return {"native": native_run, "manualbp": our_run, "memory": memory, "floor": floor}


if __name__ == "__main__":
    main()
