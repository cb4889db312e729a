"""Generation: the one path from a model's logits to text that every entry point uses.

sampling.py   SampleConfig and the logits-processor chain (Sampler)
stopping.py   when a reply ends, and the incremental detokenizer (TextStream)
decode.py     prefill + one token per step with a KV cache: complete, generate, stream
beam.py       beam search
speculative.py  speculative decoding: prompt lookup or a draft model, the same tokens sooner
"""

from .decode import (
    Completion,
    complete,
    context_budget,
    eval_mode,
    generate,
    prompt_room,
    stream,
)
from .sampling import SampleConfig, Sampler
from .stopping import TextStream, truncate_at_stop

__all__ = [
    "Completion",
    "SampleConfig",
    "Sampler",
    "TextStream",
    "complete",
    "context_budget",
    "eval_mode",
    "generate",
    "prompt_room",
    "stream",
    "truncate_at_stop",
]
