"""Fine-tuning data files read into plain Python records (another module turns them into ids).

    read_records         .jsonl / .json / .csv / .tsv -> list of dicts
    read_classification  -> [(text, label)]           e.g. SST-2 or TREC as JSONL or CSV
    read_chat            -> [[{role, content}, ...]]  chat, Alpaca, self-instruct, GSM8K, DialogSum
    label_names          -> sorted unique labels, the order saved with a model

Token-tagging files (CoNLL, CoNLL-U, IOB2) are read by tagging.py. Only the standard library
is used. Every problem with a file raises DataError with one line
that names the file, and the line or record where the problem is, and says what to change.
Files are read as UTF-8; a byte-order mark at the start (Windows editors write one) is dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
ROLES = ("system", "user", "assistant")
CHAT_SHAPES = (
    "{messages: [{role, content}, ...]}, {prompt, response[, system]}, "
    "{instruction, output[, input]}, {instruction, instances: [{input, output}, ...]}, "
    "{question, answer}, {dialogue, summary}"
)


class DataError(ValueError):
    """A data file that cannot be read as the task needs; the message names file and line."""


# --- reading text -------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A file's UTF-8 text (a .gz file decompressed)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def text_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its line ending), numbered from 1.

    Splits on "\\n" only: str.splitlines() would also split on U+2028 and other separators that
    JSON strings and tweets may hold, which shifts every line number after them.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def _kind(value: Any) -> str:
    """How a JSON value is named in messages: 'a list', 'a string', 'null', ..."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}
    return names.get(type(value), "a number")


# --- records: .jsonl, .json, .csv, .tsv ---------------------------------------------------
# Each reader yields (where, record): `where` says "FILE record N (line L)" for error messages.


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    number = 0
    for lineno, line in text_lines(text):
        if not line.strip():
            continue
        # A JSON list in a file named .jsonl starts with "[" on line 1: say how to name it.
        looks_like_json = lineno == 1 and line.lstrip().startswith("[")
        hint = "; a file holding one JSON list should be named .json" if looks_like_json else ""
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                f"each line must hold one JSON object{hint}"
            ) from None
        if not isinstance(value, dict):
            raise DataError(
                f"{path} line {lineno}: expected a JSON object, found {_kind(value)}{hint}"
            )
        number += 1
        yield f"{path} record {number} (line {lineno})", value


def _json_records(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data" after the first value is the sign of one object per line: JSONL.
        hint = (
            "; one JSON object per line belongs in a .jsonl file" if e.msg == "Extra data" else ""
        )
        raise DataError(
            f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}){hint}"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"{path}: expected a JSON list of objects [{{...}}, ...], found {_kind(value)}"
        )
    for number, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path} record {number}: expected a JSON object, found {_kind(item)}")
        yield f"{path} record {number}", item


@contextmanager
def _long_csv_fields() -> Iterator[None]:
    # csv refuses fields over 131072 characters by default; whole documents (summarization
    # sources) are longer than that. Lift the limit while reading, then put it back.
    old = csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_records(path: Path, text: str, dialect: str) -> Iterator[tuple[str, dict[str, Any]]]:
    separator = "a tab" if dialect == "excel-tab" else "','"
    # strict: an unclosed quote is an error, not a field that silently swallows the file's rest.
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect, strict=True)
    header: list[str] | None = None
    number, last_line = 0, 0
    with _long_csv_fields():
        try:
            for row in reader:
                # A quoted field may span lines: the row starts after the previous one ended.
                lineno, last_line = last_line + 1, reader.line_num
                if not row:  # a blank line
                    continue
                if header is None:
                    # "text, label" is a common hand-written header: the space is not a name.
                    header = [name.strip() for name in row]
                    repeated = sorted({name for name in header if header.count(name) > 1})
                    if repeated:
                        raise DataError(
                            f"{path} line {lineno}: column {repeated[0]!r} appears twice in the "
                            "header row; give every column its own name"
                        )
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path} line {lineno}: {len(row)} fields, but the header has "
                        f"{len(header)}; quote fields that contain {separator} or a line break"
                    )
                number += 1
                yield f"{path} record {number} (line {lineno})", dict(zip(header, row, strict=True))
        except csv.Error as e:  # raised while reading the row that starts after `last_line`
            raise DataError(
                f"{path} line {last_line + 1}: bad quoting ({e}); a field that starts with '\"' "
                "must end with one, and quotes inside it are doubled"
            ) from None


def located_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of a file, each with where it is (for error messages); any of them may be
    gzipped (data.jsonl.gz)."""
    path = Path(path)
    suffix = Path(path.name.removesuffix(".gz")).suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(RECORD_SUFFIXES)}"
        )
    text = read_text(path)
    if suffix == ".jsonl":
        records = list(_jsonl_records(path, text))
    elif suffix == ".json":
        records = list(_json_records(path, text))
    else:
        records = list(_csv_records(path, text, "excel" if suffix == ".csv" else "excel-tab"))
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a .jsonl, .json (a list of objects), .csv or .tsv file (with a header row).

    CSV and TSV values are strings; JSON values keep their JSON types.
    """
    return [record for _, record in located_records(path)]


# --- classification -----------------------------------------------------------------------


def _field(record: dict[str, Any], name: str, where: str, argument: str) -> Any:
    if name not in record:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise DataError(
            f"{where}: no field {name!r} (its fields: {fields}); "
            f"pass {argument} to name the field to use"
        )
    return record[name]


def _text_field(record: dict[str, Any], name: str, where: str, argument="text_field=") -> str:
    text = _field(record, name, where, argument)
    if not isinstance(text, str):
        raise DataError(f"{where}: field {name!r} holds {_kind(text)}, not text")
    if not text.strip():
        raise DataError(f"{where}: field {name!r} is empty; every example needs text")
    return text


def read_texts(
    path: str | Path, text_field: str = "text", argument: str = "text_field="
) -> list[tuple[dict[str, Any], str]]:
    """(record, its text) for each record of a file: what a model is to label. `argument`
    is how the caller's user names the field (an error message suggests it)."""
    return [(r, _text_field(r, text_field, where, argument)) for where, r in located_records(path)]


def read_labelled(
    path: str | Path, text_field: str = "text", label_fields: Sequence[str] = ("label",)
) -> list[tuple[str, tuple[str | None, ...]]]:
    """(text, one label per field) pairs. Labels become strings, so JSON 0/1 and CSV "0"/"1"
    agree. With several fields a record may lack some (None: a sentiment set and a topic set
    mixed), but not all."""
    pairs = []
    several = len(label_fields) > 1
    for where, record in located_records(path):
        text = _text_field(record, text_field, where)
        labels: list[str | None] = []
        for name in label_fields:
            if several and record.get(name) is None:
                labels.append(None)
                continue
            label = _field(record, name, where, "label_field=")
            # str() of a list or an object would make a label nobody meant; null or "" is none.
            if isinstance(label, dict | list) or label is None or label == "":
                shown = "empty" if label == "" else f"{_kind(label)}, not a label"
                raise DataError(f"{where}: field {name!r} is {shown}")
            labels.append(str(label))
        if all(label is None for label in labels):
            raise DataError(f"{where}: none of the fields {list(label_fields)} holds a label")
        pairs.append((text, tuple(labels)))
    return pairs


def read_classification(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs of one label field (see read_labelled)."""
    return [(text, labels[0]) for text, labels in read_labelled(path, text_field, [label_field])]


# --- chat ---------------------------------------------------------------------------------


def _text(record: dict[str, Any], key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: field {key!r} is missing")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, found {_kind(value)}")
    return value


def _instruction_chat(instruction: str, input_text: str, output: str) -> list[dict[str, str]]:
    user = f"{instruction}\n\n{input_text}" if input_text else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{where}: 'messages' must be a list, found {_kind(value)}")
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has role {role!r}; roles must be {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}: messages[{i}] content must be a string, found {_kind(content)}"
            )
        messages.append({"role": role, "content": content})  # other keys (name, ...) are dropped
    return messages


def _conversations(record: dict[str, Any], where: str) -> list[list[dict[str, str]]]:
    """The conversations one record holds (several for a self-instruct task), by its shape."""
    if "messages" in record:
        return [_messages(record["messages"], where)]
    if "prompt" in record and "response" in record:
        system = _text(record, "system", where) if "system" in record else ""
        turns = [{"role": "user", "content": _text(record, "prompt", where)}]
        turns.append({"role": "assistant", "content": _text(record, "response", where)})
        # An empty system string means no system prompt, not an empty one.
        return [[{"role": "system", "content": system}, *turns] if system else turns]
    if "instruction" in record and "output" in record:
        input_text = _text(record, "input", where) if "input" in record else ""
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        return [_instruction_chat(instruction, input_text, output)]
    if "instruction" in record and "instances" in record:
        instruction, instances = _text(record, "instruction", where), record["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
        conversations = []
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict):
                raise DataError(f"{where}: instances[{i}] must be an object {{input, output}}")
            at = f"{where} instances[{i}]"
            input_text = _text(instance, "input", at) if "input" in instance else ""
            output = _text(instance, "output", at)
            conversations.append(_instruction_chat(instruction, input_text, output))
        return conversations
    if "question" in record and "answer" in record:
        question, answer = _text(record, "question", where), _text(record, "answer", where)
        return [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]]
    if "dialogue" in record and "summary" in record:
        dialogue, summary = _text(record, "dialogue", where), _text(record, "summary", where)
        user = "Summarize this dialogue:\n" + dialogue
        return [[{"role": "user", "content": user}, {"role": "assistant", "content": summary}]]
    fields = ", ".join(repr(key) for key in record) or "none"
    raise DataError(f"{where}: not a chat record (its fields: {fields}); accepted: {CHAT_SHAPES}")


def read_chat(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations, each a list of {"role", "content"} messages; see CHAT_SHAPES for records."""
    conversations = []
    for where, record in located_records(path):
        for conversation in _conversations(record, where):
            # Nothing to learn from a conversation without an answer: an empty target.
            if not any(m["role"] == "assistant" and m["content"].strip() for m in conversation):
                raise DataError(
                    f"{where}: no assistant message with text; accepted records: {CHAT_SHAPES}"
                )
            conversations.append(conversation)
    return conversations


def label_names(labels: Iterable[str]) -> list[str]:
    """The distinct labels, sorted: a stable order to save with the model."""
    return sorted(set(labels))
