"""Token-tagging files (NER, POS) read into (words, tags) sentences, with the word and tag
columns found from the data, and a check that the tag column is a tag set.

    read_tagged          -> [(words, tags)]           CoNLL-U (UD), CoNLL / IOB2 (WNUT-17),
                                                      UniversalNER IOB2 (comments, index column)
    check_tags           refuses a tag column that is no tag set (words, "-", numbers)
    tag_scheme           which entity scheme (IOB2, BIOES, ...) the tags follow

Problems raise taskdata.DataError with one line naming the file and the fix.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .taskdata import DataError, read_text, text_lines

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
    lines = [(n, line.rstrip()) for n, line in text_lines(text)]  # trailing blanks hold no column
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
    text = read_text(path)
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
