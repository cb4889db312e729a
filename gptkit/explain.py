"""What a model looks at and how surprised it is, token by token (`gptkit explain`).

One forward pass over a text records every chosen layer's attention weights and the model's
log-probability of each token, then draws a PNG: one heatmap per layer (query rows, key
columns; mean over heads, or one head) and a bar chart of per-token log-probabilities.

The weights are not approximated: `Attention.probe` hands us the exact q, k and mask that
F.scaled_dot_product_attention receives, and we redo its softmax(q k^T / sqrt(D)) with the
same masking (the fused kernel never materialises the weights, so they must be recomputed).

Start token: the first text token has no left context, so it would get no log-probability. Like
lm-evaluation-harness, we put the tokenizer's BOS in front (its EOS when it has no BOS, as
GPT-2 does); it shows as the first token, with log-probability None. A tokenizer with neither
leaves the first text token without a log-probability.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .generation import eval_mode
from .model import GPT, ContextLengthError

if TYPE_CHECKING:
    from .api import LM

MAX_LABELLED = 40  # above this many tokens, tick labels would overlap: draw none


@dataclass
class Explanation:
    """One text as the model sees it. logprobs[i] = log p(tokens[i] | tokens[:i]) (None for the
    first token); top_tokens[i] is the model's best guess for position i, and next_token its
    guess after the text. attention[j] is layer layers[j]'s weights [H, T, S] (S = T keys, or
    more when prefix tuning prepends learned keys)."""

    tokens: list[str]
    ids: list[int]
    logprobs: list[float | None]
    top_tokens: list[str | None]
    top_logprobs: list[float | None]
    next_token: str
    layers: list[int]
    attention: list[torch.Tensor] = field(repr=False)
    path: Path | None = None


def attention_weights(q, k, mask, is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) [B, H, T, S], masked as F.scaled_dot_product_attention masks:
    q [B, H, T, D], k [B, Hkv, S, D]; mask bool (True = may attend) or None."""
    H, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=1)  # GQA: query head h reads kv head h // (H/Hkv)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if is_causal:  # SDPA's is_causal aligns the triangle top-left: query i sees keys 0..i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(dim=-1)


def record(model: GPT, ids: list[int], layers: list[int]) -> tuple[torch.Tensor, list]:
    """(logits [T, V], attention weights [H, T, S] of each of `layers`) for one sequence."""
    found: dict[int, torch.Tensor] = {}
    attns = [model.blocks[i].attn for i in layers]
    for i, attn in zip(layers, attns, strict=True):
        attn.probe = lambda q, k, mask, causal, i=i: found.__setitem__(
            i, attention_weights(q, k, mask, causal)[0].cpu()
        )
    try:
        device = model.tok_emb.weight.device
        with torch.inference_mode(), eval_mode(model):
            logits = model(torch.tensor([ids], device=device))[0].float()  # [T, V]
    finally:  # a probe left behind would slow every later forward pass
        for attn in attns:
            attn.probe = None
    return logits.cpu(), [found[i] for i in layers]


def token_label(text: str) -> str:
    """A token readable on one line: spaces as ␣, newlines and other controls escaped."""
    return repr(text)[1:-1].replace("\\'", "'").replace(" ", "␣")


def trace(lm: LM, text: str, layers: list[int] | None = None) -> Explanation:
    """Run `text` through the model once; see Explanation (no drawing)."""
    model, tok = lm.model, lm.tokenizer
    n_layer = model.config.n_layer
    layers = list(range(n_layer)) if layers is None else list(layers)
    if not layers or any(not 0 <= i < n_layer for i in layers):
        raise ValueError(f"layers {layers}: pick from 0..{n_layer - 1} ({n_layer} layers)")
    if model.config.head != "lm":
        raise ValueError(
            f"explain needs a language model; this one has a {model.config.head!r} head"
        )
    ids = tok.encode(text)
    if not ids:
        raise ValueError("the text is empty: give explain at least one token of text")
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ids = ids if start is None else [start, *ids]
    if len(ids) > model.context:
        extra = " (with the start token)" if start is not None else ""
        raise ContextLengthError(
            f"the text is {len(ids)} tokens{extra} but the model's context is "
            f"{model.context}; shorten the text"
        )
    logits, attention = record(model, ids, layers)
    logp = F.log_softmax(logits, dim=-1)  # [T, V]; row j predicts token j + 1
    best = logp.argmax(dim=-1)  # [T]
    picked = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # [T - 1]

    def piece(i) -> str:
        return tok.decode([int(i)])

    return Explanation(
        tokens=[piece(i) for i in ids],
        ids=ids,
        logprobs=[None, *picked.tolist()],
        top_tokens=[None, *(piece(i) for i in best[:-1])],
        top_logprobs=[None, *logp[:-1].max(dim=-1).values.tolist()],
        next_token=piece(best[-1]),
        layers=layers,
        attention=attention,
    )


def figure(ex: Explanation, head: int | None = None) -> Figure:
    """The heatmaps (a grid, up to 3 across) above a bar chart of log-probabilities."""
    T, n = len(ex.tokens), len(ex.layers)
    labels = [token_label(t).replace("$", r"\$") for t in ex.tokens]  # "$" would start mathtext
    named = T <= MAX_LABELLED
    cols, rows = min(n, 3), math.ceil(n / min(n, 3))
    side = min(max(3.5, 1.6 + 0.11 * T), 6.0)  # inches per heatmap: room for T labels
    fig = Figure(figsize=(max(cols * side, 6.0), rows * side + 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[side] * rows + [2.6])
    maps = []
    for w in ex.attention:  # [H, T, S]; the last T keys are the tokens (prefix keys come first)
        m = (w.mean(0) if head is None else w[head])[:, -T:].numpy()  # [T, T]
        maps.append(np.where(np.triu(np.ones((T, T), bool), 1), np.nan, m))  # blank the future
    vmax = max(float(np.nanmax(m)) for m in maps)
    what = "mean over heads" if head is None else f"head {head}"
    for j, (layer, m) in enumerate(zip(ex.layers, maps, strict=True)):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer} ({what})", fontsize="medium")
        ax.set_xlabel("key (attended to)", fontsize="small")
        if j % cols == 0:  # the rows of a grid share their queries: label them once
            ax.set_ylabel("query", fontsize="small")
        if named:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention weight")
    bars = fig.add_subplot(grid[rows, :])
    scored = [(i, lp) for i, lp in enumerate(ex.logprobs) if lp is not None]
    bars.bar([i for i, _ in scored], [lp for _, lp in scored], color="C0")
    bars.set_xlim(-0.6, T - 0.4)
    if named:
        bars.set_xticks(range(T), labels, rotation=90, fontsize=7)
    else:
        bars.set_xlabel("token position", fontsize="small")
    total = sum(lp for _, lp in scored)
    bars.set_title(f"log p(token | tokens before it); sum {total:.2f} nats", fontsize="medium")
    bars.set_ylabel("log-probability", fontsize="small")
    bars.grid(True, axis="y", alpha=0.3)
    return fig


def explain(
    lm: LM, text: str, out: str | Path, layers: list[int] | None = None, head: int | None = None
) -> Explanation:
    """Trace `text` and draw its attention maps and log-probabilities into the PNG `out`."""
    H = lm.model.config.n_head
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head {head}: pick from 0..{H - 1} ({H} heads), or none for the mean")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output {out} must be a .png file")
    ex = trace(lm, text, layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # renamed into place: never half a PNG
    try:
        figure(ex, head).savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    ex.path = out
    return ex


def format_table(ex: Explanation) -> str:
    """One line per token: position, token, its log-probability, and the model's top guess."""
    width = max(5, *(len(token_label(t)) for t in ex.tokens)) + 2
    lines = [f"{'pos':>4}  {'token':<{width}}{'logprob':>9}  top guess (logprob)"]
    for i, (t, lp, top, top_lp) in enumerate(
        zip(ex.tokens, ex.logprobs, ex.top_tokens, ex.top_logprobs, strict=True)
    ):
        score = "-" if lp is None else f"{lp:.3f}"
        guess = "" if top is None else f"{token_label(top)} ({top_lp:.3f})"
        lines.append(f"{i:>4}  {token_label(t):<{width}}{score:>9}  {guess}")
    lines.append(f"next token guess: {token_label(ex.next_token)}")
    return "\n".join(lines)
