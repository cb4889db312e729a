"""Using a fine-tuned classifier or tagger (issue 18): lm.classify / lm.tag, classifiers of
several fields at once, `gptkit predict`, the transformers-shaped pipelines, and the clear
refusal to generate text with a classify or tag head."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import FINETUNE_CHARS, save_finetune_base

import gptkit
from gptkit.checkpoint import save_checkpoint
from gptkit.config import ConfigError, preset
from gptkit.evaltasks import eval_classify
from gptkit.finetune import finetune
from gptkit.model import GPT
from gptkit.predict import FLOOR, SLACK, entities, label_function, length_batches, predict_labels
from gptkit.surgery import set_head
from gptkit.tokenizer import char_tokenizer
from gptkit.train_config import FinetuneConfig

TOPICS = {"film": ["film", "movie", "show"], "food": ["soup", "bread", "cake"]}
POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FAST = dict(lr=3e-3, batch_size=16, eval_every=0, progress=False, tensorboard=False, threads=1)


def gptkit_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptkit", *args], input=stdin, capture_output=True, text=True
    )


def example(rng: random.Random) -> dict[str, str]:
    topic, positive = rng.choice(sorted(TOPICS)), rng.random() < 0.5
    text = f"the {rng.choice(TOPICS[topic])} was {rng.choice(POS if positive else NEG)}"
    return {"text": text, "topic": topic, "sentiment": "positive" if positive else "negative"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base model, a two-field classifier (topic, sentiment), a one-field one and a
    tagger, each fine-tuned from the base for a few dozen steps."""
    d = tmp_path_factory.mktemp("predict")
    save_finetune_base(d / "base")
    rng = random.Random(0)
    rows = [example(rng) for _ in range(320)]
    (d / "news.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # One model from two data sets, as a topic set and a sentiment set are: a third of the
    # rows lack the topic and a third the sentiment.
    mixed = [
        {k: v for k, v in r.items() if k != ("", "topic", "sentiment")[i % 3]}
        for i, r in enumerate(rows)
    ]
    (d / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
    sentences = [rng.sample(POS + NEG, 4) for _ in range(120)]
    tagged = ["\n".join(f"{w}\t{'B-POS' if w in POS else 'O'}" for w in s) for s in sentences]
    (d / "tag.conll").write_text("\n\n".join(tagged) + "\n")
    runs = {
        "multi": ("classify", "mixed.jsonl", {"label_field": "topic,sentiment"}),
        "single": ("classify", "news.jsonl", {"label_field": "sentiment"}),
        "tagger": ("tag", "tag.conll", {}),
    }
    out = {"dir": d}
    for name, (objective, data, settings) in runs.items():
        config = FinetuneConfig(
            objective=objective,
            init_from=str(d / "base"),
            data=str(d / data),
            out_dir=str(d / name),
            max_steps=60,
            **FAST,
            **settings,
        )
        result = finetune(config, overwrite=True)
        out[name] = result.train.checkpoint
        out[f"{name}_metrics"] = result.metrics
    return out


def test_a_classifier_of_two_fields_learns_both_in_one_pass(models):
    metrics = models["multi_metrics"]  # on val rows labelled for each field
    assert metrics["topic_accuracy"] >= 0.9 and metrics["sentiment_accuracy"] >= 0.9, metrics
    assert metrics["topic_n"] < metrics["n"] and metrics["sentiment_n"] < metrics["n"]
    lm = gptkit.load(models["multi"])
    assert lm.config.label_fields == ["topic", "sentiment"]
    assert lm.config.label_groups() == [
        ("topic", ["film", "food"]),
        ("sentiment", ["negative", "positive"]),
    ]
    (result,) = lm.classify(["the soup was awful"])
    assert set(result) == {"topic", "sentiment"}
    assert result["topic"]["label"] == "food" and result["sentiment"]["label"] == "negative"
    for field in result.values():  # each field is its own distribution
        assert sum(field["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert field["score"] == max(field["probs"].values())
    scores = eval_classify(lm, models["dir"] / "news.jsonl")  # the model's own field names
    assert scores["topic_accuracy"] >= 0.9 and scores["sentiment_accuracy"] >= 0.9
    done = gptkit_cli(
        "eval", "classify", "--model", str(models["multi"]),
        "--data", str(models["dir"] / "news.jsonl"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "topic_macro_f1" in done.stdout and "sentiment_macro_f1" in done.stdout


def test_classify_gives_the_same_answer_alone_and_in_a_padded_batch(models):
    lm = gptkit.load(models["single"])
    texts = ["the film was great", "the cake was sad", "the show was fine indeed, yes", "bad"]
    batched = lm.classify(texts, batch_size=4)  # padded to the longest
    for text, together in zip(texts, batched, strict=True):
        (alone,) = lm.classify(text)
        assert alone["label"] == together["label"]
        for label, p in alone["probs"].items():
            assert together["probs"][label] == pytest.approx(p, abs=1e-5)
    assert [r["label"] for r in batched[:2]] == ["positive", "negative"]
    assert list(lm.classify(texts[0], top_k=1)[0]["probs"]) == [batched[0]["label"]]
    with pytest.raises(ConfigError, match="top_k"):
        lm.classify(texts, top_k=0)
    # the label table predict_labels reads agrees with classify
    assert predict_labels(lm.model, lm.tokenizer, texts)["sentiment"] == [
        r["label"] for r in batched
    ]


def test_tag_finds_entities_with_character_spans(models):
    lm = gptkit.load(models["tagger"])
    text = "bad  great nice sad"
    (found,) = lm.tag(text)
    # great and nice are adjacent B-POS words: B starts a new entity each time
    assert [(e["entity_group"], e["word"]) for e in found] == [("POS", "great"), ("POS", "nice")]
    for e in found:
        assert text[e["start"] : e["end"]] == e["word"] and 0 < e["score"] <= 1


def test_entities_merge_tags_as_the_simple_strategy_does():
    text = "Ada Lovelace met Charles Babbage in London today"
    spans = [(0, 3), (4, 12), (13, 16), (17, 24), (25, 32), (33, 35), (36, 42), (43, 48)]
    tags = ["B-PER", "I-PER", "O", "B-PER", "I-PER", "O", "I-LOC", "O"]
    found = entities(text, spans, [(t, 0.5 + i / 20) for i, t in enumerate(tags)])
    assert [(e["entity_group"], e["word"]) for e in found] == [
        ("PER", "Ada Lovelace"),
        ("PER", "Charles Babbage"),
        ("LOC", "London"),  # an I- after O starts an entity, as transformers does
    ]
    assert found[0]["score"] == pytest.approx((0.5 + 0.55) / 2)
    # BIOES: S- is a whole entity, E- closes one; a change of type starts a new one
    bioes = ["S-PER", "B-ORG", "E-ORG", "O", "B-LOC", "I-PER", "O", "O"]
    found = entities(text, spans, [(t, 1.0) for t in bioes])
    assert [(e["entity_group"], e["start"], e["end"]) for e in found] == [
        ("PER", 0, 3),
        ("ORG", 4, 16),
        ("LOC", 25, 32),
        ("PER", 33, 35),
    ]


def test_length_batches_cover_every_row_once_and_pad_little():
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 8, 12, 20, 30]) for _ in range(200)] + [300, 736, 41, 90]
    batches = length_batches(lengths, batch_size=32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 32 for b in batches)
    for b in batches:  # each pads within SLACK of its real tokens, or is small
        real = [lengths[i] for i in b]
        assert len(b) * max(real) <= max(SLACK * sum(real), FLOOR)
    assert [lengths[i] for i in batches[-1]] == [736]  # 300 and 90 would pad it far more


def test_a_classifier_refuses_to_generate_in_one_line(models):
    lm = gptkit.load(models["single"])
    with pytest.raises(ConfigError, match="needs a language model; this one has a classify head"):
        lm.generate("the film")
    done = gptkit_cli("generate", "--model", str(models["single"]), "--prompt", "the film")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "classify head" in done.stderr
    done = gptkit_cli("chat", "--model", str(models["single"]), stdin="hello\n")
    assert done.returncode == 2 and "chat needs a language model" in done.stderr, done.stderr


def test_predict_streams_a_file_out_in_input_order(models, tmp_path):
    rng = random.Random(1)
    rows = [{"id": i, **example(rng)} for i in range(40)]
    rows[3]["text"] = "the film was great, it was nice and fine and good all along"  # longest
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps({"id": r["id"], "text": r["text"]}) for r in rows))
    out = tmp_path / "out.jsonl"
    model = str(models["multi"])
    done = gptkit_cli("predict", "--model", model, "--data", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["id"] for w in written] == list(range(40))  # input order, though batched by length
    right = sum(
        w["prediction"]["topic"]["label"] == r["topic"]
        and w["prediction"]["sentiment"]["label"] == r["sentiment"]
        for w, r in zip(written, rows, strict=True)
    )
    assert right >= 36  # the same model scored >= 0.9 on each field
    # CSV out, the two best labels kept
    out_csv = tmp_path / "out.csv"
    args = ["--data", str(data), "--out", str(out_csv), "--top-k", "1"]
    done = gptkit_cli("predict", "--model", model, *args)
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(out_csv.open()))
    assert len(table) == 40 and table[0]["id"] == "0"
    first = written[0]["prediction"]
    assert table[0]["topic_label"] == first["topic"]["label"]
    assert table[0]["sentiment_label"] == first["sentiment"]["label"]
    assert f"topic_p_{first['topic']['label']}" in table[0]


def test_predict_reads_stdin_lines_and_refuses_bad_input_in_one_line(models, tmp_path):
    model = str(models["single"])
    done = gptkit_cli(
        "predict", "--model", model, "--data", "-", "--format", "csv",
        stdin="the movie was great\n\nthe bread was awful\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["text"] for r in table] == ["the movie was great", "the bread was awful"]
    assert [r["sentiment_label"] for r in table] == ["positive", "negative"]
    assert float(table[0]["sentiment_p_positive"]) > 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    cases = {
        ("--data", str(bad)): "(line 2): no field 'text' (its fields: 'body'); pass --text-field",
        ("--data", str(tmp_path / "missing.jsonl")): "no such file",
        ("--data", str(bad), "--top-k", "0"): "--top-k must be at least 1",
        ("--data", str(bad), "--out", str(tmp_path / "x.xml")): "write .jsonl, .csv or .tsv",
    }
    for args, message in cases.items():
        done = gptkit_cli("predict", "--model", model, *args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr
    done = gptkit_cli("predict", "--model", str(models["dir"] / "base"), "--data", str(bad))
    assert done.returncode == 2 and "predict needs a classifier or tagger" in done.stderr


def test_predict_reads_tsv_and_shows_progress_for_files_only(models, tmp_path):
    """A TSV file in (texts holding commas, which only a tab-separated reader keeps whole),
    TSV out, the same labels as lm.classify; a progress bar on stderr for a
    file, whose length is known, and none for stdin."""
    texts = ["the film, it was great", "the soup, sadly, was awful", "the cake was fine"]
    data = tmp_path / "in.tsv"
    data.write_text("id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.tsv"
    model = str(models["single"])
    args = ["--data", str(data), "--text-field", "body", "--out", str(out)]
    done = gptkit_cli("predict", "--model", model, *args)
    assert done.returncode == 0, done.stderr
    table = list(csv.DictReader(out.open(newline=""), dialect="excel-tab"))
    assert [(r["id"], r["body"]) for r in table] == [(str(i), t) for i, t in enumerate(texts)]
    expected = gptkit.load(models["single"]).classify(texts)
    assert [r["sentiment_label"] for r in table] == [e["label"] for e in expected]
    assert out.read_text().splitlines()[0].split("\t")[:3] == ["id", "body", "sentiment_label"]
    assert "predict: 100%" in done.stderr and "3/3" in done.stderr, done.stderr
    done = gptkit_cli("predict", "--model", model, "--data", "-", stdin="\n".join(texts))
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 3, done.stderr
    assert "predict" not in done.stderr and "%|" not in done.stderr, done.stderr


def test_predict_and_eval_in_bfloat16_stay_close_to_float32(models, tmp_path):
    rng = random.Random(2)
    rows = [example(rng) for _ in range(24)]
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    model = str(models["single"])
    probs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.jsonl"
        args = ["--data", str(data), "--out", str(out), "--dtype", dtype]
        done = gptkit_cli("predict", "--model", model, *args)
        assert done.returncode == 0, done.stderr
        written = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
        probs[dtype] = torch.tensor([w["probs"]["positive"] for w in written])  # [N]
    assert not torch.equal(probs["float32"], probs["bfloat16"])  # bfloat16 really ran
    torch.testing.assert_close(probs["bfloat16"], probs["float32"], atol=0.03, rtol=0)
    args = ["--data", str(data), "--label-field", "sentiment", "--dtype", "bfloat16"]
    done = gptkit_cli("eval", "classify", "--model", model, *args)
    assert done.returncode == 0 and "accuracy" in done.stdout, done.stderr
    refused = {
        ("predict", "--model", model, "--data", str(data), "--dtype", "bfloat16",
         "--quantize", "int8"): "--dtype bfloat16 with --quantize int8: pick one of them",
        ("eval", "retrieval", "--index", str(tmp_path), "--data", str(data), "--dtype",
         "bfloat16"): "--dtype is for eval of a model's scores, not eval retrieval",
    }  # fmt: skip
    for argv, message in refused.items():
        done = gptkit_cli(*argv)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr


def test_the_monitors_label_function_computes_in_the_dtype_asked(models):
    lm = gptkit.load(models["single"], device="cpu")
    seen = []
    lm.model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    for dtype in ("float32", "bfloat16"):
        assert label_function(lm, dtype=dtype)(["the film was good"]) in (
            [{"sentiment": "positive"}],
            [{"sentiment": "negative"}],
        )
    assert seen == [torch.float32, torch.bfloat16]


def test_predict_with_a_tagger_writes_entities(models, tmp_path):
    data = tmp_path / "in.csv"
    data.write_text("text\nbad great sad\nnice poor\n")
    done = gptkit_cli("predict", "--model", str(models["tagger"]), "--data", str(data))
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in done.stdout.splitlines()]
    assert [[e["word"] for e in w["prediction"]] for w in written] == [["great"], ["nice"]]


def test_pipelines_answer_in_transformers_shapes(models):
    classifier = gptkit.pipeline("sentiment-analysis", models["single"])
    one = classifier("the film was great")
    assert isinstance(one, list) and set(one[0]) == {"label", "score"}
    assert one[0]["label"] == "positive"
    many = classifier(["the film was great", "the soup was bad"])
    assert [m["label"] for m in many] == ["positive", "negative"]
    table = classifier("the film was great", top_k=None)
    assert sorted(t["label"] for t in table) == ["negative", "positive"]
    assert sum(t["score"] for t in table) == pytest.approx(1.0, abs=1e-5)
    both = gptkit.pipeline("text-classification", models["multi"])("the cake was nice")
    assert {(e["field"], e["label"]) for e in both} == {
        ("topic", "food"),
        ("sentiment", "positive"),
    }

    ner = gptkit.pipeline("ner", models["tagger"])
    assert [e["word"] for e in ner("sad nice")] == ["nice"]

    lm = gptkit.load(models["multi"])
    extract = gptkit.pipeline("feature-extraction", lm)
    (features,) = extract("the film")
    ids = torch.tensor([lm.tokenizer.encode("the film")])
    expected = lm.model.eval().features(ids)[0]
    assert torch.allclose(torch.tensor(features), expected, atol=1e-5)
    with pytest.raises(ValueError, match="unsupported pipeline task"):
        gptkit.pipeline("fill-mask", lm)
    with pytest.raises(ConfigError, match="needs a model with a classify head"):
        gptkit.pipeline("text-classification", models["tagger"])("x")


def test_a_served_classifier_answers_v1_classify_in_vllms_shape(models):
    from fastapi.testclient import TestClient

    from gptkit.serve import ServeConfig, create_app

    lm = gptkit.load(models["multi"])
    config = ServeConfig(api_key="k", max_queue=4, allowed_hosts=("testserver",))
    key = {"Authorization": "Bearer k"}
    with TestClient(create_app(lm, "news", config)) as client:
        texts = ["the soup was awful", "the film was great", "the cake was nice"]
        reply = client.post("/v1/classify", json={"model": "news", "input": texts}, headers=key)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "list" and body["model"] == "news"
        assert body["id"].startswith("classify-") and body["usage"]["completion_tokens"] == 0
        assert body["usage"]["prompt_tokens"] == sum(len(t) + 1 for t in texts)  # chars + EOS
        expected = lm.classify(texts)
        for i, (entry, want) in enumerate(zip(body["data"], expected, strict=True)):
            assert entry["index"] == i and entry["object"] == "classify"
            assert entry["label"] == want["topic"]["label"]  # the first field at the top
            assert entry["fields"]["sentiment"]["label"] == want["sentiment"]["label"]
            assert entry["num_classes"] == 2 and sum(entry["probs"]) == pytest.approx(1, abs=1e-5)
            assert entry["fields"]["sentiment"]["probs"] == pytest.approx(
                list(want["sentiment"]["probs"].values()), abs=1e-5
            )
        one = client.post("/v1/classify", json={"model": "news", "input": "bad"}, headers=key)
        assert one.status_code == 200 and len(one.json()["data"]) == 1
        card = client.get("/v1/models", headers=key).json()["data"][0]
        assert card["labels"] == {"topic": ["film", "food"], "sentiment": ["negative", "positive"]}
        refused = {
            "/v1/completions": {"model": "news", "prompt": "the film"},
            "/v1/chat/completions": {
                "model": "news",
                "messages": [{"role": "user", "content": "x"}],
            },
        }
        for route, request in refused.items():
            reply = client.post(route, json=request, headers=key)
            assert reply.status_code == 400, reply.text
            assert "is a classifier" in reply.json()["error"]["message"]
        bad = [
            ({"model": "other", "input": "x"}, 404),
            ({"model": "news", "input": []}, 400),
            ({"model": "news", "input": ""}, 400),
            ({"model": "news", "input": ["x"] * 257}, 400),
            ({"model": "news", "input": 3}, 400),
            ({"model": "news", "input": "x", "extra": 1}, 400),
        ]
        for request, status in bad:
            reply = client.post("/v1/classify", json=request, headers=key)
            assert reply.status_code == status, (request, reply.text)
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        assert client.post("/v1/classify", json={"model": "news", "input": "x"}).status_code == 401
        assert client.get("/health").json()["status"] == "ok"  # still serving


def test_v1_classify_keeps_the_body_and_queue_limits(models, monkeypatch):
    """413 for a body over max_body_bytes (by Content-Length, and counted when chunked), 503
    with Retry-After while max_queue requests wait for the classifier, 200 again once it is
    free: the limits the generating and embedding routes keep."""
    from fastapi.testclient import TestClient

    from gptkit import classify_api
    from gptkit.serve import ServeConfig, create_app

    go, started = threading.Event(), threading.Event()
    real = classify_api.class_probs

    def held(*args, **kwargs):  # the worker waits here until the test lets it go
        started.set()
        assert go.wait(30)
        return real(*args, **kwargs)

    config = ServeConfig(max_queue=1, max_body_bytes=2048, allowed_hosts=("testserver",))
    ok = {"model": "news", "input": ["the film was great"]}
    with TestClient(create_app(gptkit.load(models["multi"]), "news", config)) as client:
        big = {"model": "news", "input": ["the film was great"] * 200}  # over 2048 bytes
        for reply in (
            client.post("/v1/classify", json=big),
            client.post(
                "/v1/classify",
                content=iter([json.dumps(big).encode()]),  # no Content-Length
                headers={"content-type": "application/json"},
            ),
        ):
            assert reply.status_code == 413, reply.text
            assert reply.json()["error"]["code"] == "too_large"
        monkeypatch.setattr(classify_api, "class_probs", held)
        first: list = []
        worker = threading.Thread(target=lambda: first.append(client.post("/v1/classify", json=ok)))
        worker.start()
        try:
            assert started.wait(30)  # the first request holds the one worker
            busy = client.post("/v1/classify", json=ok)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "overloaded"
            assert busy.headers["retry-after"] == "1"
        finally:
            go.set()
            worker.join(30)
        assert first[0].status_code == 200 and len(first[0].json()["data"]) == 1
        assert client.post("/v1/classify", json=ok).status_code == 200  # the queue drained


def test_serve_refuses_classify_on_a_language_model_and_any_tagger(models):
    from fastapi.testclient import TestClient

    from gptkit.serve import ServeConfig, create_app

    config = ServeConfig(allowed_hosts=("testserver",))
    base = gptkit.load(models["dir"] / "base")
    with TestClient(create_app(base, "base", config)) as client:
        reply = client.post("/v1/classify", json={"model": "base", "input": "x"})
        assert reply.status_code == 400 and "needs a classifier" in reply.text
    with pytest.raises(ConfigError, match="serving a tagger is not supported"):
        create_app(gptkit.load(models["tagger"]), "tagger", config)


def test_a_classifier_saved_before_heads_lost_their_bias_still_loads(tmp_path):
    """Checkpoints from before score_bias existed have score.bias and no such config key."""
    from gptkit.checkpoint import load_checkpoint

    tok = char_tokenizer(FINETUNE_CHARS, special_tokens=["<|endoftext|>"])
    model = GPT(preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64))
    set_head(model, "classify", ["neg", "pos"], bias=True)
    torch.nn.init.normal_(model.score.bias)
    save_checkpoint(tmp_path / "old", model, tok)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["model"]["score_bias"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded, _, _ = load_checkpoint(tmp_path / "old")
    assert loaded.config.score_bias and torch.equal(loaded.score.bias, model.score.bias)
