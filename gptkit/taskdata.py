"""Fine-tuning data files read into plain Python records (another module turns them into ids).

    read_records         .jsonl / .json / .csv / .tsv -> list of dicts
    read_classification  -> [(text, label)]           e.g. SST-2 or TREC as JSONL or CSV
    read_chat            -> [[{role, content}, ...]]  chat, Alpaca, self-instruct, GSM8K, DialogSum
    read_tagged          -> [(words, tags)]           CoNLL-U (UD), CoNLL / IOB2 (WNUT-17),
                                                      UniversalNER IOB2 (comments, index column)
    check_tags           refuses a tag column that is no tag set (words, "-", numbers)
    label_names          -> sorted unique labels, the order saved with a model

Only the standard library is used. Every problem with a file raises DataError with one line
that names the file, and the line or record where the problem is, and says what to change.
Files are read as UTF-8; a byte-order mark at the start (Windows editors write one) is dropped.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; check the path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
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


def _lines(text: str) -> Iterator[tuple[int, str]]:
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
    for lineno, line in _lines(text):
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


def _load(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """The records of a file, each with where it is (for error messages)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(RECORD_SUFFIXES)}"
        )
    text = _read_text(path)
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
    return [record for _, record in _load(path)]


# --- classification -----------------------------------------------------------------------


def _field(record: dict[str, Any], name: str, where: str, argument: str) -> Any:
    if name not in record:
        fields = ", ".join(repr(key) for key in record) or "none"
        raise DataError(
            f"{where}: no field {name!r} (its fields: {fields}); "
            f"pass {argument}= to name the field to use"
        )
    return record[name]


def read_classification(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> list[tuple[str, str]]:
    """(text, label) pairs. Labels become strings, so JSON 0/1 and CSV "0"/"1" agree."""
    pairs = []
    for where, record in _load(path):
        text = _field(record, text_field, where, "text_field")
        label = _field(record, label_field, where, "label_field")
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} holds {_kind(text)}, not text")
        if not text.strip():
            raise DataError(f"{where}: field {text_field!r} is empty; every example needs text")
        # str() of a list or an object would make a label nobody meant; null or "" is no label.
        if isinstance(label, dict | list) or label is None or label == "":
            shown = "empty" if label == "" else f"{_kind(label)}, not a label"
            raise DataError(f"{where}: field {label_field!r} is {shown}")
        pairs.append((text, str(label)))
    return pairs


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
    for where, record in _load(path):
        for conversation in _conversations(record, where):
            # Nothing to learn from a conversation without an answer: an empty target.
            if not any(m["role"] == "assistant" and m["content"].strip() for m in conversation):
                raise DataError(
                    f"{where}: no assistant message with text; accepted records: {CHAT_SHAPES}"
                )
            conversations.append(conversation)
    return conversations


# --- tagging ------------------------------------------------------------------------------
# A tagged file is rows of columns, one token per row, a blank line between sentences. Which
# column holds the word and which the tag differs by format, and a wrong guess trains on garbage
# without any error (words or "-" as "tags"), so the columns are found from the data:
#
#   CoNLL-2003     EU NNP B-NP B-ORG            word first, NER tag the last BIO column
#   WNUT-17        #photography<TAB>O           "#" rows are tokens (hashtags), not comments
#   UniversalNER   # sent_id = ... / # text = ...   then  3<TAB>tampa<TAB>B-LOC<TAB>-<TAB>-
#   CoNLL-U        ID FORM LEMMA UPOS XPOS ...  (10 tab columns) FORM and UPOS
#
# check_tags() then refuses a tag column that cannot be a tag set, before anything trains on it.

CONLLU_ID, CONLLU_FORM, CONLLU_UPOS = 0, 1, 3  # 0-based CoNLL-U columns
CONLLU_COLUMNS = 10
UPOS = frozenset(  # the 17 universal POS tags
    {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON"}
    | {"PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"}
)
# "# key = value" (CoNLL-U, UniversalNER: sent_id, text, newdoc id, ...) and CoNLL-U's bare
# "# newdoc" / "# newpar". A hashtag row ("#photography<TAB>O", "#<TAB>O") matches neither.
_COMMENT = re.compile(r"# ?[\w.:-]+ =(?: |$)|# ?(?:newdoc|newpar)\b")
_CONLLU_ID = re.compile(r"\d+(?:-\d+|\.\d+)?")  # 3, a multiword range 2-3, an empty node 8.1
_NUMBER = re.compile(r"[+-]?\d+(?:[.,]\d+)?")
PLACEHOLDERS = frozenset({"-", "_", ""})  # what formats write in an unused column
# A column with more distinct values than this, a quarter of them used once, holds words: real
# tag sets are small (17 UPOS, ~50 XPOS, 4 x types + 1 for BIOES) and reuse every tag often.
MAX_TAGS = 50
MAX_NUMBER_LABELS = 20  # more distinct numbers than this number things (heads, offsets)
FIX_COLUMNS = (
    "set word_column= and tag_column= (gptkit eval tag: --word-column, --tag-column), counting "
    "from 0, to the columns of the words and the tags"
)
ENTITY_SCHEMES = ("IOB1", "IOB2", "BIOES", "BILOU")


def is_entity_tag(tag: str) -> bool:
    """O, or a B-/I-/E-/S-/L-/U- prefix and a type: a tag of an entity scheme."""
    return tag == "O" or (len(tag) > 2 and tag[1] == "-" and tag[0] in "BIESLU")


def tag_scheme(sentences_tags: Iterable[Sequence[str]]) -> str:
    """The tagging scheme the tags follow: "IOB2" (every entity starts with B-), "IOB1" (an
    entity may start with I-, as in the original CoNLL-2003 files), "BIOES", "BILOU", or
    "none (UPOS-like)" / "none" for tags that name no entities (POS tags and the like)."""
    sentences = [list(tags) for tags in sentences_tags]
    distinct = {tag for tags in sentences for tag in tags}
    if not all(map(is_entity_tag, distinct)) or distinct <= {"O"}:
        return "none (UPOS-like)" if distinct and distinct <= UPOS else "none"
    prefixes = {tag[0] for tag in distinct if tag != "O"}
    if prefixes & {"L", "U"}:
        return "BILOU"
    if prefixes & {"E", "S"}:
        return "BIOES"
    for tags in sentences:
        for previous, tag in zip(["O", *tags], tags, strict=False):
            if tag.startswith("I-") and previous[2:] != tag[2:]:
                return "IOB1"
    return "IOB2"


@dataclass
class TaggedFile:
    """A tagged file as read: its sentences, and the columns the words and tags came from."""

    path: Path
    sentences: list[tuple[list[str], list[str]]]
    word_column: int  # 0-based
    tag_column: int  # -1: each row's last column (rows of different widths)
    layout: str  # "CoNLL-U", "indexed" (an integer index column first) or "CoNLL"

    @property
    def scheme(self) -> str:
        return tag_scheme(tags for _, tags in self.sentences)


def _token_rows(path: Path, text: str, conllu: bool) -> list[list[tuple[int, list[str]]]]:
    """The sentences as lists of (line number, columns), comments and document breaks dropped.

    A "#" line is a comment when CoNLL-U says so (any "#" line in a .conllu file), or by its
    shape at a sentence start: "# key = value", or no tab where the token rows have tabs.
    Anywhere else it is a token: WNUT-17's hashtags, or "#" itself.
    """
    lines = [(n, line.rstrip()) for n, line in _lines(text)]  # trailing blanks hold no column
    tabbed = conllu or any("\t" in line for _, line in lines)
    sentences: list[list[tuple[int, list[str]]]] = [[]]
    for lineno, line in lines:
        # A blank line, or one of only spaces and tabs (WNUT-17 has those), ends a sentence;
        # so does CoNLL-2003's "-DOCSTART-" document break.
        if not line or (not conllu and line.startswith("-DOCSTART-")):
            sentences.append([])
            continue
        if line.startswith("#") and (
            conllu
            or (not sentences[-1] and (_COMMENT.match(line) or (tabbed and "\t" not in line)))
        ):
            continue
        # CoNLL-U columns are tabs only (a FORM may hold a space); CoNLL uses tabs or spaces.
        fields = line.split("\t") if conllu or "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(
                f"{path} line {lineno}: expected at least 2 tab- or space-separated columns "
                f"(word and tag), found {len(fields)}: {line[:60]!r}"
            )
        sentences[-1].append((lineno, fields))
    return [rows for rows in sentences if rows]


def _indexed(sentences: list[list[tuple[int, list[str]]]]) -> bool:
    """Whether the first column numbers the tokens 1, 2, 3, ... in every sentence (the index
    column of UniversalNER and CoNLL-U), with a word and a tag after it."""
    return all(
        len(fields) >= 3 and fields[0] == str(k)
        for rows in sentences
        for k, (_, fields) in enumerate(rows, start=1)
    )


def _is_conllu(sentences: list[list[tuple[int, list[str]]]]) -> bool:
    """CoNLL-U by shape (a .conllu file under another name): 10 columns, an ID first."""
    return all(
        len(fields) == CONLLU_COLUMNS and _CONLLU_ID.fullmatch(fields[CONLLU_ID])
        for rows in sentences
        for _, fields in rows
    )


def _columns(
    sentences: list[list[tuple[int, list[str]]]], conllu: bool
) -> tuple[str, int, int | None]:
    """(layout, word column, tag column or None): found from the rows, before any override.
    The tag column is the last one whose every value fits an entity scheme (CoNLL-2003's NER
    column comes after its chunk column, which is BIO too); None means no column fits, and -1
    each row's last column (rows of different widths)."""
    if conllu:
        return "CoNLL-U", CONLLU_FORM, CONLLU_UPOS
    indexed = _indexed(sentences)
    word = 1 if indexed else 0
    widths = {len(fields) for rows in sentences for _, fields in rows}
    if len(widths) > 1:  # rows of different widths: no column but the last is in every row
        return ("indexed" if indexed else "CoNLL"), word, -1
    width = widths.pop()
    fitting = [
        c
        for c in range(word + 1, width)
        if all(is_entity_tag(fields[c]) for rows in sentences for _, fields in rows)
    ]
    return ("indexed" if indexed else "CoNLL"), word, (fitting[-1] if fitting else None)


def read_tagged_file(
    path: str | Path, *, word_column: int | None = None, tag_column: int | None = None
) -> TaggedFile:
    """The sentences of CoNLL-U (.conllu, or any file of that shape), CoNLL / IOB2 (WNUT-17,
    CoNLL-2003) or UniversalNER IOB2 (comment lines, an index column), with the columns used.

    The word is FORM in CoNLL-U, the column after an integer index column (1, 2, 3, ... per
    sentence), else the first; the tag is UPOS in CoNLL-U, else the last column whose values
    all fit a BIO/BIOES scheme, else the last column. `word_column` / `tag_column` (counting
    from 0) override either. CoNLL-U multiword-token ranges ("1-2") and empty nodes ("8.1")
    are skipped: the words are the syntactic words the tags belong to.
    """
    for name, value in (("word_column", word_column), ("tag_column", tag_column)):
        if value is not None and value < 0:
            raise DataError(f"{name}= counts columns from 0, got {value}")
    path = Path(path)
    text = _read_text(path)
    named_conllu = path.suffix.lower() == ".conllu"
    sentences = _token_rows(path, text, named_conllu)
    if not sentences:
        raise DataError(f"{path}: no sentences found (no token lines)")
    conllu = named_conllu or _is_conllu(sentences)
    layout, word, tag = _columns(sentences, conllu)
    word = word if word_column is None else word_column
    if tag_column is not None:
        tag = tag_column
    elif tag is None:  # no BIO column: the last one (a POS tag, or what check_tags refuses)
        tag = min(len(fields) for rows in sentences for _, fields in rows) - 1
    needed = max(2, word + 1, tag + 1)
    raw = [line.rstrip() for line in text.split("\n")]  # the lines as written, for messages
    read: list[tuple[list[str], list[str]]] = []
    for rows in sentences:
        words, tags = [], []
        for lineno, fields in rows:
            if len(fields) < needed:
                separator = "tab" if conllu else "tab- or space"
                raise DataError(
                    f"{path} line {lineno}: expected at least {needed} {separator}-separated "
                    f"columns (word and tag), found {len(fields)}: {raw[lineno - 1][:60]!r}"
                )
            if conllu and not fields[CONLLU_ID].isdigit():
                continue  # a multiword token ("1-2" don't) or an empty node: no tag of its own
            words.append(fields[word])
            tags.append(fields[tag])
        if words:
            read.append((words, tags))
    if not read:
        raise DataError(f"{path}: no sentences found (no token lines)")
    return TaggedFile(path, read, word, tag, layout)


def read_tagged(
    path: str | Path, *, word_column: int | None = None, tag_column: int | None = None
) -> list[tuple[list[str], list[str]]]:
    """(words, tags) per sentence; see read_tagged_file for the formats and columns."""
    return read_tagged_file(path, word_column=word_column, tag_column=tag_column).sentences


def _shown(values: Iterable[str], n: int = 3) -> str:
    return ", ".join(repr(v) for v in list(values)[:n])


def _numbering(column: list[list[str]]) -> bool:
    """Whether a column's values (per sentence) number something rather than label it: all
    numbers, and 1, 2, 3, ... in every sentence (an index) or more distinct ones than a label
    set has (CoNLL-U's HEAD, offsets). Labels 0/1 or a few grades are numbers and still labels."""
    distinct = {value for sentence in column for value in sentence}
    if not all(_NUMBER.fullmatch(value) for value in distinct):
        return False
    index = all(sentence == [str(k) for k in range(1, len(sentence) + 1)] for sentence in column)
    return index or len(distinct) > MAX_NUMBER_LABELS


def check_tags(tagged: TaggedFile) -> None:
    """Refuse, with one line saying what was found and which options to set, words and tags
    that cannot be what the file means: a tag column all "-", words or tags that number the
    tokens (an index column), or a tag set too large and too rarely reused to be one (words)."""
    path, w = tagged.path, tagged.word_column
    t = f"column {tagged.tag_column}" if tagged.tag_column >= 0 else "the last column"
    tags = [tag for _, ts in tagged.sentences for tag in ts]
    counts = collections.Counter(tags)
    if set(counts) <= PLACEHOLDERS:
        raise DataError(
            f"{path}: every tag ({t}) is {_shown(counts)}, an unused column; {FIX_COLUMNS}"
        )
    if _numbering([ts for _, ts in tagged.sentences]):
        raise DataError(
            f"{path}: every tag ({t}) is a number ({_shown(counts)}, ...), as in an "
            f"index column; {FIX_COLUMNS}"
        )
    if _numbering([ws for ws, _ in tagged.sentences]):
        words = sorted(
            {word for ws, _ in tagged.sentences for word in ws}, key=lambda word: (len(word), word)
        )
        raise DataError(
            f"{path}: every word (column {w}) is a number ({_shown(words)}, ...), as in an "
            f"index column; {FIX_COLUMNS}"
        )
    if tagged.scheme in ENTITY_SCHEMES:
        return  # all O / B-X / I-X ...: an entity tag set, however many types it names
    once = [tag for tag, n in counts.items() if n == 1]  # in first-seen order
    if len(counts) > MAX_TAGS and len(once) >= len(counts) / 4:
        raise DataError(
            f"{path}: {len(counts):,} distinct tags over {len(tags):,} tokens in {t}, "
            f"{len(once):,} of them used once; tags such as {_shown(once)} look like words, "
            f"not a tag set; {FIX_COLUMNS}"
        )


def label_names(labels: Iterable[str]) -> list[str]:
    """The distinct labels, sorted: a stable order to save with the model."""
    return sorted(set(labels))
