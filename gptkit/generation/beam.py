"""Beam search, scored as transformers scores it: 2 * num_beams candidates per step,
hypotheses finish at an end token, a stop string or the length limit with
score / generated_len ** length_penalty, and the search stops early once no running beam can
beat the finished ones. No draw is made, so its output is token-identical to
`transformers.generate(num_beams=...)` on the same weights."""

from __future__ import annotations

import torch

from ..model import GPT
from .sampling import SampleConfig, Sampler
from .stopping import Decode, completes_stop


def beam_search(
    model: GPT,
    prompt: list[int],
    sample: SampleConfig,
    max_new: int,
    sampler: Sampler,
    end_ids: set[int],
    decode: Decode | None,
) -> list[list[int]]:
    """The `num_return_sequences` best beams for one prompt, best first (HF's scoring).

    max_new: the context budget (> 0); sampler: num_beams rows of this prompt (the penalties,
    which transformers applies to log-probabilities here); end_ids: tokens that end a beam.
    The caller (decode.complete) runs it in eval and inference mode."""
    nb, device = sample.num_beams, model.tok_emb.weight.device
    cache = model.new_cache(1, len(prompt) + max_new - 1)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)
    cache.reorder(torch.zeros(nb, dtype=torch.long, device=device))  # nb copies of the prefill
    logits = logits.expand(nb, -1, -1)
    beams: list[list[int]] = [[] for _ in range(nb)]
    # Only beam 0 is live at first, so the first step picks nb distinct tokens.
    scores = torch.full((nb,), -1e9, device=device)
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []  # (length-normalised score, tokens)

    for step in range(max_new):
        gen_len = step + 1
        logprobs = sampler.penalise(sampler.mask(logits[:, -1].float()).log_softmax(dim=-1))
        V = logprobs.size(-1)
        total = (logprobs + scores[:, None]).view(-1)  # [nb * V]
        top_scores, top_idx = torch.topk(total, 2 * nb)
        next_beams, next_scores, parents = [], [], []
        for rank, (score, flat) in enumerate(
            zip(top_scores.tolist(), top_idx.tolist(), strict=True)
        ):
            parent, token = divmod(flat, V)
            seq = beams[parent] + [token]
            ends = (
                token in end_ids or gen_len == max_new or completes_stop(decode, seq, sample.stop)
            )
            if ends:
                if rank < nb:  # only the top nb candidates may become hypotheses
                    finished.append((score / gen_len**sample.length_penalty, seq))
            elif len(next_beams) < nb:
                next_beams.append(seq)
                next_scores.append(score)
                parents.append(parent)
        finished = sorted(finished, key=lambda h: -h[0])[:nb]
        if len(next_beams) < nb or gen_len == max_new:
            break
        # transformers' default early stop: once nb hypotheses exist, stop when the best
        # running beam, normalised at the current length, cannot beat the worst of them.
        best_running = next_scores[0] / gen_len**sample.length_penalty
        if len(finished) == nb and best_running <= finished[-1][0]:
            break
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        index = torch.tensor(parents, device=device)
        cache.reorder(index)
        sampler.reorder(index)
        token = torch.tensor([b[-1] for b in beams], device=device)
        sampler.advance(token)
        logits = model(token[:, None], cache=cache, last_only=True)
    return [seq for _, seq in finished[: sample.num_return_sequences]]
