"""prepare.py: corpus -> token shards + meta.json, and the shard header checks."""

import csv
import json
import struct
import sys

import numpy as np
import pytest

from gptkit import sources
from gptkit.prepare import PrepareError, prepare
from gptkit.shards import HEADER, MAGIC, ShardError, read_shard
from gptkit.tokenizer import ENDOFTEXT, CharTokenizer, char_tokenizer
from gptkit.tokenizer_files import load_tokenizer

DOCS = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(40)]
CHARS = "".join(DOCS) + "\ufffdé"


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(CHARS, special_tokens=[ENDOFTEXT])


def write_docs(folder, docs=DOCS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return folder


def tokens(out, meta, split):
    shards = [read_shard(out / name) for name in meta["splits"][split]["shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, np.uint16)


def split_texts(out, meta, tok, split):
    """The split's documents, decoded and cut at eos."""
    text = tok.decode(tokens(out, meta, split).tolist())
    assert text == "" or text.endswith(ENDOFTEXT)
    return text.split(ENDOFTEXT)[:-1]


def run(sources, out, tok, **kwargs):
    return prepare(sources, out, tok, progress=False, workers=1, **kwargs)


def test_round_trip_split_by_document_and_meta(tmp_path, tok):
    corpus = write_docs(tmp_path / "corpus")
    meta = run([corpus], tmp_path / "out", tok, val_fraction=0.2, seed=3)
    train, val = (split_texts(tmp_path / "out", meta, tok, s) for s in ("train", "val"))
    assert 0 < len(val) < len(DOCS) and len(train) + len(val) == len(DOCS)
    # every document lands whole in one split, in corpus order within each split
    assert sorted(train + val) == sorted(DOCS)
    assert train == [d for d in DOCS if d in train] and val == [d for d in DOCS if d in val]
    assert meta["splits"]["val"]["documents"] == len(val)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(
        len(d) + 1 for d in DOCS
    )
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["eos_id"] == tok.eos_id
    assert meta["bytes"] == sum(len(d.encode()) for d in DOCS) and meta["mb_per_s"] > 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    saved = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert saved.encode(DOCS[0]) == tok.encode(DOCS[0])
    # the same seed gives the same split; another seed another one
    again = run([corpus], tmp_path / "again", tok, val_fraction=0.2, seed=3)
    assert split_texts(tmp_path / "again", again, tok, "val") == val
    other = run([corpus], tmp_path / "other", tok, val_fraction=0.2, seed=4)
    assert split_texts(tmp_path / "other", other, tok, "val") != val


def test_at_least_one_val_document(tmp_path, tok):
    meta = run([write_docs(tmp_path / "c", DOCS[:2])], tmp_path / "out", tok, val_fraction=1e-9)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 1
    assert split_texts(tmp_path / "out", meta, tok, "val") == [DOCS[1]]


def test_uint32_for_large_vocab(tmp_path):
    big = CharTokenizer([chr(0x10000 + i) for i in range(70_000)] + list(CHARS), [ENDOFTEXT])
    meta = run([write_docs(tmp_path / "c", DOCS[:3])], tmp_path / "out", big)
    assert meta["dtype"] == "uint32"
    ids = tokens(tmp_path / "out", meta, "train")
    assert ids.dtype == np.dtype("<u4") and ids[-1] == big.eos_id > 65535


def test_shard_rollover(tmp_path, tok):
    meta = run([write_docs(tmp_path / "c")], tmp_path / "out", tok, shard_tokens=100)
    train = meta["splits"]["train"]
    assert len(train["shards"]) == -(-train["tokens"] // 100) > 5
    sizes = [len(read_shard(tmp_path / "out" / name)) for name in train["shards"]]
    assert sizes[:-1] == [100] * (len(sizes) - 1)
    assert "".join(split_texts(tmp_path / "out", meta, tok, "train")) == "".join(
        d for d in DOCS if d in split_texts(tmp_path / "out", meta, tok, "train")
    )
    # a second run into the same folder leaves no stale shards behind
    meta = run([write_docs(tmp_path / "c")], tmp_path / "out", tok)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == sorted(
        meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]
    )


def test_header_errors(tmp_path, tok):
    meta = run([write_docs(tmp_path / "c", DOCS[:2])], tmp_path / "out", tok, val_fraction=0)
    good = (tmp_path / "out" / meta["splits"]["train"]["shards"][0]).read_bytes()
    count = HEADER.unpack(good[: HEADER.size])[3]
    cases = {
        "not a gptkit token shard": b"NOTTOKEN" + good[8:],
        "newer gptkit": good[:8] + struct.pack("<I", 9) + good[12:],
        "unknown token width 3": good[:12] + struct.pack("<I", 3) + good[16:],
        f"truncated: header says {count} tokens, file holds {count - 2}": good[:-4],
        "trailing bytes": good + b"\0\0",
        "no b'GPTKTOK": MAGIC[:4],
    }
    for expected, data in cases.items():
        path = tmp_path / "bad.bin"
        path.write_bytes(data)
        with pytest.raises(ShardError, match=str(path)) as info:
            read_shard(path)
        assert expected in str(info.value)


def test_non_utf8_reported_and_replaced(tmp_path, tok, capsys):
    corpus = write_docs(tmp_path / "c", DOCS[:3])
    (corpus / "bad.txt").write_bytes(b"caf\xc3\xa9 ok\n" + b"bad \xff\xfe here\n")
    meta = run([corpus], tmp_path / "out", tok, val_fraction=0)
    [error] = meta["decode_errors"]
    assert error == {"file": str(corpus / "bad.txt"), "offset": 13, "bad_bytes": 2}
    assert "offset 13" in capsys.readouterr().err
    texts = split_texts(tmp_path / "out", meta, tok, "train")
    assert "café ok\nbad \ufffd\ufffd here\n" in texts


def test_long_text_file_in_pieces(tmp_path, monkeypatch):
    """A file longer than a piece is still one document, decoded exactly (also a huge line)."""

    monkeypatch.setattr(sources, "PIECE_BYTES", 64)
    text = "".join(DOCS) + "é" * 300 + "\n" + "\xff".join(DOCS[:3])
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode().replace("\xff".encode(), b"\xff"))
    big = char_tokenizer(text + "\ufffd", special_tokens=[ENDOFTEXT])
    meta = run([path], tmp_path / "out", big, val_fraction=0)  # one document, kept whole
    assert split_texts(tmp_path / "out", meta, big, "train") == [text.replace("\xff", "\ufffd")]
    assert meta["decode_errors"][0]["bad_bytes"] == 2


def test_empty_corpus_and_bad_sources(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(PrepareError, match="empty corpus"):
        run([tmp_path / "empty"], tmp_path / "out", tok)
    with pytest.raises(PrepareError, match="no such file"):
        run([tmp_path / "missing"], tmp_path / "out", tok)
    (tmp_path / "none").mkdir()
    with pytest.raises(PrepareError, match="holds no"):
        run([tmp_path / "none"], tmp_path / "out", tok)
    with pytest.raises(PrepareError, match="end-of-text"):
        run([tmp_path / "empty"], tmp_path / "out", char_tokenizer("abc"))


def test_jsonl_csv_parquet_columns(tmp_path, tok):
    rows = [{"id": i, "body": doc} for i, doc in enumerate(DOCS[:6])]
    (tmp_path / "c").mkdir()
    with (tmp_path / "c" / "a.jsonl").open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows[:2])
    with (tmp_path / "c" / "b.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "body"])
        writer.writeheader()
        writer.writerows(rows[2:4])
    sources = [tmp_path / "c" / "a.jsonl", tmp_path / "c" / "b.csv"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "c" / "c.parquet")
        sources.append(tmp_path / "c" / "c.parquet")
    except ImportError:
        rows = rows[:4]  # parquet needs pyarrow; the rest is still checked
    meta = run([tmp_path / "c"], tmp_path / "out", tok, text_column="body", val_fraction=0)
    assert split_texts(tmp_path / "out", meta, tok, "train") == [r["body"] for r in rows]
    for source in sources:
        with pytest.raises(PrepareError, match="no 'text' column"):
            run([source], tmp_path / "out", tok)


def test_parquet_needs_pyarrow_or_reads(tmp_path, tok):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[:3] + [None]}), tmp_path / "a.parquet")
    meta = run([tmp_path / "a.parquet"], tmp_path / "out", tok, val_fraction=0)
    assert split_texts(tmp_path / "out", meta, tok, "train") == DOCS[:3]


def test_workers_give_identical_output(tmp_path):
    gpt2 = load_tokenizer("gpt2")
    corpus = write_docs(tmp_path / "c", DOCS * 5)
    metas = [
        prepare([corpus], tmp_path / f"w{w}", gpt2, workers=w, progress=False, val_fraction=0.1)
        for w in (1, 2)
    ]
    assert metas[0]["splits"] == metas[1]["splits"]
    for split in ("train", "val"):
        for name in metas[0]["splits"][split]["shards"]:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert split_texts(tmp_path / "w2", metas[1], gpt2, "val")


def test_errors_from_rows_and_workers(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(PrepareError, match="line 2: column 'text' holds int"):
        run([tmp_path / "a.jsonl"], tmp_path / "out", tok)
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(PrepareError, match="line 2 is not JSON"):
        run([tmp_path / "b.jsonl"], tmp_path / "out", tok)
    long = "the lazy dog " * 20_000  # past csv's default 128 KB field limit
    (tmp_path / "c.csv").write_text(f'text\n"{long}"\n')
    meta = run([tmp_path / "c.csv"], tmp_path / "out", tok, val_fraction=0)
    assert split_texts(tmp_path / "out", meta, tok, "train") == [long]
    # a tokenizer error inside a worker process reaches the caller as itself
    (tmp_path / "d.txt").write_text("Zebra")
    with pytest.raises(ValueError, match="'Z'"):
        prepare([tmp_path / "d.txt"], tmp_path / "out", tok, workers=2, progress=False)


def test_dataset_without_datasets_package(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails, as uninstalled
    with pytest.raises(PrepareError, match="pip install datasets"):
        run([], tmp_path / "out", tok, dataset="some/name")


def test_a_single_text_file_is_split_by_position_like_nanogpt(tmp_path):
    text = "".join(f"line {i}: to be or not to be.\n" for i in range(400))
    (tmp_path / "input.txt").write_text(text)
    tok = char_tokenizer(text, special_tokens=["<|endoftext|>"])
    meta = prepare([tmp_path / "input.txt"], tmp_path / "out", tok, val_fraction=0.1, workers=1)
    train = np.concatenate(
        [read_shard(tmp_path / "out" / n) for n in meta["splits"]["train"]["shards"]]
    )
    val = np.concatenate(
        [read_shard(tmp_path / "out" / n) for n in meta["splits"]["val"]["shards"]]
    )
    assert tok.decode(train.tolist() + val.tolist()) == text + "<|endoftext|>"
    assert abs(len(val) / (len(train) + len(val)) - 0.1) < 0.001
    assert meta["splits"]["val"]["documents"] == meta["splits"]["train"]["documents"] == 1


@pytest.mark.parametrize("hold_back", [1 << 24, 300])
def test_held_document_spilled_to_disk_gives_identical_output(
    tmp_path, tok, monkeypatch, hold_back
):
    """A held-back document past SPILL_TOKENS waits in a file, not memory: same shards (also
    when it outgrows HOLD_BACK_TOKENS and is written to train after all)."""
    import gptkit.prepare as prep

    monkeypatch.setattr(prep, "HOLD_BACK_TOKENS", hold_back)
    (tmp_path / "one.txt").write_text("".join(DOCS))  # one document, split by position
    corpus = write_docs(tmp_path / "c", ["".join(DOCS[i : i + 8]) for i in range(0, 40, 8)])
    for source in (tmp_path / "one.txt", corpus):
        outs = []
        for spill in (1 << 20, 50):  # in memory, then on disk in pieces of 50 tokens
            monkeypatch.setattr(prep, "SPILL_TOKENS", spill)
            out = tmp_path / f"out_{source.name}_{spill}"
            meta = run([source], out, tok, val_fraction=0.3, seed=1, shard_tokens=128)
            outs.append((out, meta))
        (a, meta_a), (b, meta_b) = outs
        assert meta_a["splits"] == meta_b["splits"]
        assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
        for name in (p.name for p in a.glob("*.bin")):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_long_rows_are_tokenized_in_pieces(tmp_path, monkeypatch):
    """A JSONL/CSV row longer than a piece reaches the tokenizer in pieces (cut after a newline
    where there is one), like a text file, and is still one whole document."""
    import gptkit.prepare as prep

    monkeypatch.setattr(sources, "PIECE_BYTES", 64)
    encoded: list[str] = []
    real_encode = prep._encode

    def spy(batch, tokenizer=None):
        encoded.extend(text for text, _ in batch)
        return real_encode(batch, tokenizer)

    monkeypatch.setattr(prep, "_encode", spy)
    lines = "".join(DOCS[:8])  # newlines to cut after
    flat = "é" * 300  # none: cut at a character
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": lines}) + "\n")
    with (tmp_path / "rows.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["text"], [flat]])
    big = char_tokenizer(lines + flat, special_tokens=[ENDOFTEXT])
    for name, row in (("rows.jsonl", lines), ("rows.csv", flat)):
        encoded.clear()
        meta = run([tmp_path / name], tmp_path / "out", big, val_fraction=0)
        assert split_texts(tmp_path / "out", meta, big, "train") == [row]
        assert len(encoded) > 4 and max(map(len, encoded)) <= 64, [len(t) for t in encoded]
        assert "".join(encoded) == row
    encoded.clear()
    run([tmp_path / "rows.jsonl"], tmp_path / "out", big, val_fraction=0)
    assert all(piece.endswith("\n") for piece in encoded[:-1])


def test_a_long_row_is_tokenized_in_bounded_memory(tmp_path):
    """One 10 MB JSONL row with Hugging Face's BPE (GPT-2's own files): the process grew by
    ~1.1 GB when the row went to the tokenizer whole; in pieces it grows by ~70 MB."""
    import subprocess
    import sys
    from pathlib import Path

    gpt2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-tokenizer"
    if not (gpt2 / "vocab.bpe").is_file():
        pytest.skip(f"{gpt2} is absent (GPT-2's encoder.json + vocab.bpe)")
    rng = np.random.default_rng(0)
    words = np.array(["lorem", "ipsum", "dolor", "sit", "amet", "elit", "sed", "do"])
    text = " ".join(rng.choice(words, 1_700_000))[:10_000_000]
    (tmp_path / "row.jsonl").write_text(json.dumps({"text": text}) + "\n")
    script = f"""
import resource, sys
from gptkit.prepare import prepare
from gptkit.tokenizer_files import load_tokenizer
tok = load_tokenizer({str(gpt2)!r})
tok.encode_many(["warm up the tokenizer's own buffers"] * 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare([{str(tmp_path / "row.jsonl")!r}], {str(tmp_path / "out")!r}, tok, workers=1,
        progress=False, val_fraction=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb = int(done.stdout.split()[-1])
    assert grown_mb < 300, f"prepare grew by {grown_mb} MB for a 10 MB row"


def test_lone_surrogate_in_a_row_names_file_and_line(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(PrepareError) as info:
        run([tmp_path / "a.jsonl"], tmp_path / "out", tok)
    message = str(info.value)
    assert f"{tmp_path / 'a.jsonl'} line 2" in message and "surrogate" in message, message
    assert "\n" not in message


def test_empty_out_dir_is_refused(tmp_path, tok, monkeypatch, capsys):
    """`--out ""` wrote the shards into the current directory."""
    from gptkit.cli import main

    corpus = write_docs(tmp_path / "c", DOCS[:2])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(PrepareError, match="output directory is empty"):
        run([corpus], "", tok)
    assert main(["prepare", str(corpus), "--out", "", "--tokenizer", "gpt2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("gptkit: error: ")
    assert list(work.iterdir()) == []
