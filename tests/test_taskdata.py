"""Reading fine-tuning data: records, classification pairs, chats, tagged sentences.

Small files built in tmp_path pin every format and every error message; the real data sets in
../shared/data (skipped when absent) check the readers against published counts.
"""

import csv
import gzip
import importlib.util
import re
from pathlib import Path

import pytest

from gptkit.tagging import check_tags, read_tagged, read_tagged_file, tag_scheme
from gptkit.taskdata import DataError, label_names, read_chat, read_classification, read_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def shared(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data sets are expected in ../shared/data)")
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation, exactly this text
    return path


def error(read, *args, **kwargs) -> str:
    """The message of the DataError `read` raises, checked to be one line."""
    with pytest.raises(DataError) as caught:
        read(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- read_records -------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_and_a_leading_byte_order_mark(tmp_path):
    path = write(tmp_path, "d.jsonl", '\ufeff{"a": 1}\n\n  \n{"a": [2, "x"]}\r\n')
    assert read_records(path) == [{"a": 1}, {"a": [2, "x"]}]


def test_gzipped_files_read_like_plain_ones_and_a_cut_one_is_named(tmp_path):
    rows = '{"text": "ok", "label": "a"}\n{"text": "fine", "label": "b"}\n'
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    (tmp_path / "d.jsonl").write_text(rows)
    assert read_records(tmp_path / "d.jsonl.gz") == read_records(tmp_path / "d.jsonl")
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(b"text,label\nok,a\n")[:-6])
    with pytest.raises(DataError, match="cut.csv.gz: cannot be read"):
        read_records(tmp_path / "cut.csv.gz")


def test_json_list_of_objects(tmp_path):
    path = write(tmp_path, "d.json", '[{"text": "hi", "label": 0},\n {"text": "yo", "label": 1}]')
    assert read_records(path) == [{"text": "hi", "label": 0}, {"text": "yo", "label": 1}]


def test_csv_handles_quoted_commas_line_breaks_and_quotes(tmp_path):
    rows = [["text", "label"], ["a, b", "1"], ["two\nlines", "0"], ['say "hi"', "1"]]
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    assert read_records(path) == [
        {"text": "a, b", "label": "1"},
        {"text": "two\nlines", "label": "0"},
        {"text": 'say "hi"', "label": "1"},
    ]


def test_csv_header_names_lose_surrounding_spaces(tmp_path):
    path = write(tmp_path, "d.csv", "text, label\nhello,1\n")
    assert read_records(path) == [{"text": "hello", "label": "1"}]


def test_tsv_reads_tabs_and_excel_quoting(tmp_path):
    path = write(tmp_path, "d.TSV", 'text\tlabel\nit, was\t1\n"a\ttab"\t0\n')
    assert read_records(path) == [
        {"text": "it, was", "label": "1"},
        {"text": "a\ttab", "label": "0"},
    ]


def test_csv_fields_longer_than_the_csv_module_default_limit(tmp_path):
    long_text = "x" * 200_000  # csv's default field_size_limit is 131072
    path = write(tmp_path, "d.csv", f"text,label\n{long_text},1\n")
    before = csv.field_size_limit()
    assert read_records(path) == [{"text": long_text, "label": "1"}]
    assert csv.field_size_limit() == before  # the limit is put back


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    path = write(tmp_path, "d.parquet", "x")
    message = error(read_records, path)
    assert str(path) in message and ".jsonl, .json, .csv, .tsv" in message


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert error(read_records, missing) == f"{missing}: no such file; check the path"
    empty = write(tmp_path, "e.jsonl", "\n \n")
    assert error(read_records, empty) == f"{empty}: the file is empty"
    only_header = write(tmp_path, "h.csv", "text,label\n")
    assert error(read_records, only_header) == f"{only_header}: holds no records"
    assert error(read_records, write(tmp_path, "l.json", "[]")).endswith(": holds no records")


def test_bad_jsonl_lines_are_named_by_their_line_number(tmp_path):
    # U+2028 is legal raw inside a JSON string: it must not count as a line break.
    path = write(tmp_path, "d.jsonl", '{"a": "x\u2028y"}\n\n{"a": 1,}\n')
    assert error(read_records, path).startswith(f"{path} line 3: not valid JSON (")
    path = write(tmp_path, "d.jsonl", '{"a": 1}\n"just a string"\n')
    assert error(read_records, path) == f"{path} line 2: expected a JSON object, found a string"


def test_a_json_list_named_jsonl_gets_a_hint(tmp_path):
    one_line = write(tmp_path, "a.jsonl", '[{"a": 1}]\n')
    assert error(read_records, one_line).endswith("should be named .json")
    spread = write(tmp_path, "b.jsonl", '[\n{"a": 1}\n]\n')
    assert error(read_records, spread).endswith("should be named .json")


def test_bad_json_files(tmp_path):
    lines = write(tmp_path, "d.json", '{"a": 1}\n{"a": 2}\n')
    message = error(read_records, lines)
    assert message.startswith(f"{lines} line 2: not valid JSON (Extra data")
    assert message.endswith("one JSON object per line belongs in a .jsonl file")
    an_object = write(tmp_path, "o.json", '{"data": []}')
    assert "expected a JSON list of objects" in error(read_records, an_object)
    mixed = write(tmp_path, "m.json", '[{"a": 1}, 7]')
    assert error(read_records, mixed) == f"{mixed} record 2: expected a JSON object, found a number"


def test_csv_row_with_the_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\nfine,1\n\nnot, fine,0\n")
    message = error(read_records, path)
    assert message.startswith(f"{path} line 4: 3 fields, but the header has 2; quote fields")


def test_csv_unclosed_quote_is_an_error_on_the_line_it_opens(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\nok,1\n"never closed,0\nmore,1\n')
    assert error(read_records, path).startswith(f"{path} line 3: bad quoting (")
    # Without strict quoting the TSV reader would silently glue the next lines into one field.
    path = write(tmp_path, "d.tsv", 'text\tlabel\n"Great" movie\t1\n')
    assert error(read_records, path).startswith(f"{path} line 2: bad quoting (")


def test_csv_header_with_a_repeated_column(tmp_path):
    path = write(tmp_path, "d.csv", "text,text\na,b\n")
    assert "line 1: column 'text' appears twice" in error(read_records, path)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    assert error(read_records, path).startswith(f"{path} line 2: not UTF-8 text")


# --- read_classification -------------------------------------------------------------------


def test_classification_pairs_with_labels_as_strings(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    assert read_classification(path) == [("good", "1"), ("bad", "0")]
    csv_path = write(tmp_path, "d.csv", "label,text\n1,good\n0,bad\n")
    assert read_classification(csv_path) == read_classification(path)


def test_classification_with_other_field_names(tmp_path):
    path = write(tmp_path, "d.json", '[{"sentence": "What is X?", "coarse": "DESC"}]')
    pairs = read_classification(path, text_field="sentence", label_field="coarse")
    assert pairs == [("What is X?", "DESC")]


def test_a_missing_field_names_file_record_line_and_the_fields_there_are(tmp_path):
    path = write(
        tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n\n{"sentence": "b", "label": 0}\n'
    )
    assert error(read_classification, path) == (
        f"{path} record 2 (line 3): no field 'text' (its fields: 'sentence', 'label'); "
        "pass text_field= to name the field to use"
    )
    message = error(read_classification, path, label_field="y")
    assert message.startswith(f"{path} record 1 (line 1): no field 'y'")
    assert "pass label_field=" in message


def test_classification_rejects_empty_text_and_missing_labels(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\n  ,1\n")
    assert error(read_classification, path) == (
        f"{path} record 1 (line 2): field 'text' is empty; every example needs text"
    )
    path = write(tmp_path, "d.csv", "text,label\nfine,\n")
    assert error(read_classification, path) == f"{path} record 1 (line 2): field 'label' is empty"
    path = write(tmp_path, "d.json", '[{"text": "x", "label": null}]')
    assert (
        error(read_classification, path) == f"{path} record 1: field 'label' is null, not a label"
    )
    path = write(tmp_path, "d.jsonl", '{"text": ["a", "b"], "label": 1}\n')
    assert "field 'text' holds a list, not text" in error(read_classification, path)


# --- read_chat ----------------------------------------------------------------------------


def test_chat_messages_keep_role_and_content_only(tmp_path):
    record = '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", '
    record += '"content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hello."}]}'
    path = write(tmp_path, "d.jsonl", record + "\n")
    assert read_chat(path) == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    ]


def test_chat_prompt_response_with_and_without_system(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"prompt": "P", "response": "R", "system": "S"}\n'
        '{"prompt": "P", "response": "R", "system": ""}\n'
        '{"prompt": "P", "response": "R"}\n',
    )
    user, assistant = {"role": "user", "content": "P"}, {"role": "assistant", "content": "R"}
    assert read_chat(path) == [
        [{"role": "system", "content": "S"}, user, assistant],
        [user, assistant],
        [user, assistant],
    ]


def test_chat_alpaca_joins_instruction_and_input(tmp_path):
    path = write(
        tmp_path,
        "d.json",
        '[{"instruction": "Translate.", "input": "Hallo", "output": "Hello"},'
        ' {"instruction": "Say hi.", "input": "", "output": "Hi"},'
        ' {"instruction": "Count.", "output": "1 2 3"}]',
    )
    users = [c[0]["content"] for c in read_chat(path)]
    assert users == ["Translate.\n\nHallo", "Say hi.", "Count."]


def test_chat_self_instruct_gives_one_conversation_per_instance(tmp_path):
    record = '{"instruction": "Antonym?", "instances": [{"input": "hot", "output": "cold"}, '
    record += '{"input": "up", "output": "down"}], "is_classification": false}'
    path = write(tmp_path, "d.jsonl", record + "\n")
    assert read_chat(path) == [
        [
            {"role": "user", "content": "Antonym?\n\nhot"},
            {"role": "assistant", "content": "cold"},
        ],
        [{"role": "user", "content": "Antonym?\n\nup"}, {"role": "assistant", "content": "down"}],
    ]


def test_chat_gsm8k_and_dialogsum_shapes(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n'
        '{"dialogue": "#Person1#: Hi.", "summary": "A greeting.", "topic": "hi"}\n',
    )
    assert read_chat(path) == [
        [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "1+1=2\n#### 2"}],
        [
            {"role": "user", "content": "Summarize this dialogue:\n#Person1#: Hi."},
            {"role": "assistant", "content": "A greeting."},
        ],
    ]


def test_chat_shapes_are_checked_in_order(tmp_path):
    # "output" (shape 3) wins over "instances" (shape 4); "messages" wins over everything.
    path = write(
        tmp_path,
        "d.jsonl",
        '{"instruction": "I", "output": "O", "instances": [{"input": "", "output": "X"}]}\n'
        '{"messages": [{"role": "assistant", "content": "M"}], "question": "Q", "answer": "A"}\n',
    )
    assert [c[-1]["content"] for c in read_chat(path)] == ["O", "M"]


def test_chat_from_csv_columns(tmp_path):
    path = write(tmp_path, "d.csv", 'instruction,input,output\nAdd.,"1, 2",3\n')
    assert read_chat(path) == [
        [{"role": "user", "content": "Add.\n\n1, 2"}, {"role": "assistant", "content": "3"}]
    ]


def test_chat_record_of_no_known_shape(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"prompt": "P", "completion": "C"}\n')
    message = error(read_chat, path)
    assert message.startswith(
        f"{path} record 1 (line 1): not a chat record (its fields: 'prompt', 'completion'); "
    )
    assert "{prompt, response[, system]}" in message and "{dialogue, summary}" in message


def test_chat_needs_an_assistant_message_with_text(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"messages": [{"role": "user", "content": "Hi"}]}\n')
    message = error(read_chat, path)
    assert message.startswith(f"{path} record 1 (line 1): no assistant message with text; ")
    assert "{question, answer}" in message
    path = write(
        tmp_path, "d.json", '[{"question": "Q", "answer": "A"}, {"question": "Q", "answer": " "}]'
    )
    assert error(read_chat, path).startswith(f"{path} record 2: no assistant message with text")


def test_chat_message_errors_name_the_message(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"messages": [{"role": "bot", "content": "Hi"}]}\n')
    assert error(read_chat, path) == (
        f"{path} record 1 (line 1): messages[0] has role 'bot'; "
        "roles must be system, user, assistant"
    )
    path = write(tmp_path, "d.jsonl", '{"messages": [{"role": "assistant", "content": null}]}\n')
    assert "messages[0] content must be a string, found null" in error(read_chat, path)
    path = write(tmp_path, "d.jsonl", '{"instruction": "I", "instances": [{"input": "x"}]}\n')
    assert (
        error(read_chat, path)
        == f"{path} record 1 (line 1) instances[0]: field 'output' is missing"
    )
    path = write(tmp_path, "d.jsonl", '{"question": 3, "answer": "A"}\n')
    assert "field 'question' must be a string, found a number" in error(read_chat, path)


# --- read_tagged --------------------------------------------------------------------------

CONLLU = """\
# sent_id = 1
# text = I didn't go.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdid\tdo\tAUX\tVBD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
4.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t4:conj\tCopyOf=4
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tNew York\tNew York\tPROPN\tNNP\t_\t0\troot\t_\t_
"""


def test_conllu_words_and_upos_skip_comments_ranges_and_empty_nodes(tmp_path):
    path = write(tmp_path, "d.conllu", CONLLU)  # no blank line after the last sentence
    assert read_tagged(path) == [
        (["I", "did", "n't", "go", "."], ["PRON", "AUX", "PART", "VERB", "PUNCT"]),
        (["New York"], ["PROPN"]),  # a FORM may hold a space: CoNLL-U columns are tabs only
    ]
    assert read_tagged(path, tag_column=4)[0][1] == ["PRP", "VBD", "RB", "VB", "."]  # XPOS


def test_conll_iob_tabs_spaces_docstart_and_hashtag_tokens(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\n"
        "#photography\tO\nParis\tB-location\n\t\n"  # a lone tab separates, as in WNUT-17
        "Hi\tO\n"
    )
    path = write(tmp_path, "d.txt", text)
    assert read_tagged(path) == [
        (["EU", "rejects"], ["B-ORG", "O"]),
        (["#photography", "Paris"], ["O", "B-location"]),
        (["Hi"], ["O"]),
    ]
    path = write(tmp_path, "d.conll", "EU NNP B-NP B-ORG\n")
    assert read_tagged(path, tag_column=1) == [(["EU"], ["NNP"])]


def test_tagged_line_with_too_few_columns(tmp_path):
    path = write(tmp_path, "d.conll", "Paris\tB-location\n\nlonely\n")
    message = error(read_tagged, path)
    assert message.startswith(f"{path} line 3: expected at least 2 tab- or space-separated columns")
    assert message.endswith("found 1: 'lonely'")
    path = write(tmp_path, "d.conllu", "1\tI\tI\n")
    assert error(read_tagged, path).startswith(f"{path} line 1: expected at least 4 tab-separated")
    path = write(tmp_path, "d.iob", "EU NNP B-ORG\n")
    assert "expected at least 6" in error(read_tagged, path, tag_column=5)


def test_tagged_file_without_sentences(tmp_path):
    path = write(tmp_path, "d.conllu", "# only a comment\n\n")
    assert error(read_tagged, path) == f"{path}: no sentences found (no token lines)"
    path = write(tmp_path, "d.conll", "-DOCSTART- O\n\n")
    assert error(read_tagged, path) == f"{path}: no sentences found (no token lines)"


def test_tagged_columns_count_from_zero(tmp_path):
    path = write(tmp_path, "d.conll", "a\tO\n")
    assert error(read_tagged, path, tag_column=-1) == "tag_column= counts columns from 0, got -1"
    assert error(read_tagged, path, word_column=-2) == "word_column= counts columns from 0, got -2"


# --- the formats of tagged files, as their authors mean them (tests/fixtures/tagging) --------

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tagging"


def test_universalner_iob2_skips_comments_and_the_index_column():
    tagged = read_tagged_file(FIXTURES / "universalner.iob2")
    assert (tagged.layout, tagged.word_column, tagged.tag_column) == ("indexed", 1, 2)
    assert tagged.sentences == [
        (["Thanks!!", "ENA."], ["O", "B-ORG"]),  # "# text = Thanks!! ENA." is no token
        (
            ["I", "flew", "to", "tampa", "bay", "last", "week", "#travel"],
            ["O", "O", "O", "B-LOC", "I-LOC", "O", "O", "O"],
        ),
        (["Ask", "John", "Smith"], ["O", "B-PER", "I-PER"]),
    ]
    assert tagged.scheme == "IOB2"
    check_tags(tagged)  # a real tag set: no refusal


def test_wnut_hashtag_rows_are_tokens_even_at_a_sentence_start():
    tagged = read_tagged_file(FIXTURES / "wnut17.conll")
    assert tagged.sentences == [
        (["#photography", "by", "Paris", "#"], ["O", "O", "B-location", "O"]),
        (
            ["#", "#BlackLivesMatter", "march", "in", "New", "York"],
            ["O", "B-group", "O", "O", "B-location", "I-location"],
        ),
    ]
    assert (tagged.word_column, tagged.tag_column, tagged.scheme) == (0, 1, "IOB2")


def test_conll2003_takes_the_last_bio_column_not_the_chunks():
    tagged = read_tagged_file(FIXTURES / "conll2003.txt")
    # words, POS, chunk (I-NP: BIO-shaped too), NER: the NER column is the last that fits
    assert (tagged.layout, tagged.word_column, tagged.tag_column) == ("CoNLL", 0, 3)
    assert tagged.sentences[1] == (["Peter", "Blackburn"], ["I-PER", "I-PER"])
    assert len(tagged.sentences) == 3  # "-DOCSTART-" lines end sentences and are dropped
    assert tagged.scheme == "IOB1"  # the original files start entities with I-
    assert read_tagged(FIXTURES / "conll2003.txt", tag_column=2)[1][1] == ["I-NP", "I-NP"]


def test_conllu_by_name_or_by_shape(tmp_path):
    expected = [
        (["I", "did", "n't", "go", "to", "New York", "."], "PRON AUX PART VERB ADP PROPN PUNCT"),
        (["#hashtags", "count"], "NOUN VERB"),
    ]
    expected = [(words, tags.split()) for words, tags in expected]
    assert read_tagged(FIXTURES / "ud.conllu") == expected
    renamed = write(tmp_path, "ud.txt", (FIXTURES / "ud.conllu").read_text(encoding="utf-8"))
    tagged = read_tagged_file(renamed)
    assert (tagged.layout, tagged.sentences, tagged.scheme) == (
        "CoNLL-U",
        expected,
        "none (UPOS-like)",
    )


def test_bioes_tags_are_found_and_named():
    tagged = read_tagged_file(FIXTURES / "bioes.conll")
    assert tagged.sentences[0] == (
        ["Barack", "Obama", "visited", "Paris"],
        ["B-PER", "E-PER", "O", "S-LOC"],
    )
    assert tagged.scheme == "BIOES"


@pytest.mark.parametrize(
    ("tags", "scheme"),
    [
        ([["B-PER", "I-PER", "O"]], "IOB2"),
        ([["O", "I-PER", "I-PER"]], "IOB1"),
        ([["B-PER", "I-PER"], ["O", "I-LOC"]], "IOB1"),  # I-LOC after O starts an entity
        ([["S-PER", "O", "B-LOC", "E-LOC"]], "BIOES"),
        ([["U-PER", "B-LOC", "L-LOC"]], "BILOU"),
        ([["NOUN", "VERB", "X"]], "none (UPOS-like)"),
        ([["NN", "VBD"]], "none"),
        ([["O", "O"]], "none"),  # no entity at all
        ([["B-PER", "NOUN"]], "none"),  # mixed: not a scheme
    ],
)
def test_tag_scheme(tags, scheme):
    assert tag_scheme(tags) == scheme


def test_swapped_columns_read_right_with_word_and_tag_column(tmp_path):
    path = write(tmp_path, "d.tsv", "B-PER\tAda\nO\tsings\n\nO\tHi\n")
    assert read_tagged(path, word_column=1, tag_column=0) == [
        (["Ada", "sings"], ["B-PER", "O"]),
        (["Hi"], ["O"]),
    ]


# --- implausible tag sets are refused -------------------------------------------------------


def test_an_untagged_column_is_refused_with_the_options_to_set():
    # UniversalNER's shape with the tag column left "-": the last column is "-" too.
    tagged = read_tagged_file(FIXTURES / "universalner-untagged.iob2")
    message = error(check_tags, tagged)
    assert message == (
        f"{tagged.path}: every tag (column 4) is '-', an unused column; set word_column= and "
        "tag_column= (gptkit eval tag: --word-column, --tag-column), counting from 0, to the "
        "columns of the words and the tags"
    )
    # The columns the old reader took (the index as the word, the last "-" as the tag).
    old = read_tagged_file(FIXTURES / "universalner.iob2", word_column=0, tag_column=4)
    assert "every tag (column 4) is '-'" in error(check_tags, old)
    index_as_tags = read_tagged_file(FIXTURES / "universalner.iob2", tag_column=0)
    assert "every tag (column 0) is a number ('1', '2'" in error(check_tags, index_as_tags)
    index_as_words = read_tagged_file(FIXTURES / "universalner.iob2", word_column=0)
    assert "every word (column 0) is a number" in error(check_tags, index_as_words)


def test_words_as_tags_are_refused(tmp_path):
    # 60 sentences of distinct words tagged in column 0 by mistake: a "tag set" of ~300 tags.
    sentences = ["\n".join(f"word{i}x{j}\tNOUN" for j in range(5)) for i in range(60)]
    path = write(tmp_path, "d.conll", "\n\n".join(sentences) + "\n")
    message = error(check_tags, read_tagged_file(path, tag_column=0))
    assert message.startswith(
        f"{path}: 300 distinct tags over 300 tokens in column 0, 300 of them used once; "
        "tags such as 'word0x0', 'word0x1', 'word0x2' look like words, not a tag set; "
        "set word_column= and tag_column="
    )
    check_tags(read_tagged_file(path))  # column 1 (NOUN): fine


def test_real_tag_sets_pass_the_check(tmp_path):
    check_tags(read_tagged_file(FIXTURES / "ud.conllu", tag_column=4))  # XPOS
    # Numbers can be labels (0/1 per token, as in error detection): not an index column.
    check_tags(read_tagged_file(write(tmp_path, "d.tsv", "I\t0\nsees\t1\n\nHi\t0\n")))
    check_tags(read_tagged_file(FIXTURES / "conll2003.txt"))
    check_tags(read_tagged_file(FIXTURES / "bioes.conll"))


def test_label_names_are_sorted_and_unique():
    assert label_names(["O", "B-person", "O", "I-person", "B-location"]) == [
        "B-location",
        "B-person",
        "I-person",
        "O",
    ]
    assert label_names([]) == []


# --- the real data sets -------------------------------------------------------------------

# The 17 universal POS tags.
UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON"}
UPOS |= {"PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"}
WNUT_TYPES = {"person", "location", "group", "creative-work", "corporation", "product"}


def test_ud_english_ewt_dev_sentences_words_and_tags():
    path = shared("ud-english-ewt/en_ewt-ud-dev.conllu")
    lines = path.read_text(encoding="utf-8").split("\n")
    word_lines = [line.split("\t") for line in lines if re.match(r"\d+\t", line)]
    assert any(re.match(r"\d+-\d+\t", line) for line in lines)  # the file has multiword tokens
    assert any(re.match(r"\d+\.\d+\t", line) for line in lines)  # ... and empty nodes
    sentences = read_tagged(path)
    assert len(sentences) == sum(line.startswith("# sent_id") for line in lines) == 2001
    words = [w for ws, _ in sentences for w in ws]
    tags = [t for _, ts in sentences for t in ts]
    assert words == [f[1] for f in word_lines]  # exactly the integer-ID lines, in order
    assert tags == [f[3] for f in word_lines]
    assert set(tags) == UPOS  # no "_" from a multiword-token line
    assert sentences[0] == (
        ["From", "the", "AP", "comes", "this", "story", ":"],
        ["ADP", "DET", "PROPN", "VERB", "DET", "NOUN", "PUNCT"],
    )


def _check_iob2(sentences: list[tuple[list[str], list[str]]]) -> None:
    for words, tags in sentences:
        assert len(words) == len(tags)
        for previous, tag in zip(["O", *tags], tags, strict=False):
            assert tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:] in WNUT_TYPES), tag
            if tag.startswith("I-"):  # IOB2: an inside tag continues an entity of its type
                assert previous[2:] == tag[2:], (previous, tag)


@pytest.mark.parametrize(
    ("name", "n_sentences", "n_tokens"),
    [
        ("wnut17train.conll", 3394, 62730),
        ("emerging.dev.conll", 1009, 15733),
        ("emerging.test.annotated", 1287, 23394),
    ],
)
def test_wnut17_counts_and_iob2_tags(name, n_sentences, n_tokens):
    path = shared(f"wnut17/{name}")
    sentences = read_tagged(path)
    assert len(sentences) == n_sentences  # the counts wnut17/SOURCE.txt gives
    assert sum(len(words) for words, _ in sentences) == n_tokens
    _check_iob2(sentences)
    # Lines starting with "#" are hashtag tokens here, not comments.
    text = path.read_text(encoding="utf-8")
    hashtags = sum(line.startswith("#") for line in text.split("\n"))
    assert sum(w.startswith("#") for ws, _ in sentences for w in ws) == hashtags > 0


def universalner(sentences: list[tuple[list[str], list[str]]]) -> str:
    """Sentences in UniversalNER's .iob2 shape, written by bench/universalner.py (the writer
    of the closing run's files): comment lines, then index, token, tag, -, -."""
    spec = importlib.util.spec_from_file_location("universalner", ROOT / "bench/universalner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.universalner(sentences, "s")


def test_wnut17_in_universalner_shape_reads_the_same_words_and_tags(tmp_path):
    original = read_tagged(shared("wnut17/emerging.dev.conll"))
    path = write(tmp_path, "dev.iob2", universalner(original))
    tagged = read_tagged_file(path)
    assert (tagged.word_column, tagged.tag_column, tagged.scheme) == (1, 2, "IOB2")
    assert tagged.sentences == original  # no comment line became a token, no "-" a tag
    check_tags(tagged)


def test_real_files_with_a_wrong_column_are_refused():
    wnut = shared("wnut17/emerging.dev.conll")
    check_tags(read_tagged_file(wnut))
    message = error(check_tags, read_tagged_file(wnut, tag_column=0))  # the words as tags
    assert re.match(rf"{re.escape(str(wnut))}: [\d,]+ distinct tags over 15,733 tokens", message)
    ud = shared("ud-english-ewt/en_ewt-ud-dev.conllu")
    check_tags(read_tagged_file(ud))
    check_tags(read_tagged_file(ud, tag_column=4))  # XPOS: ~50 tags, a real tag set
    assert "look like words" in error(check_tags, read_tagged_file(ud, tag_column=2))  # LEMMA
    head = error(check_tags, read_tagged_file(ud, tag_column=6))  # HEAD: numbers, not labels
    assert "every tag (column 6) is a number" in head
    assert "every tag (column 0) is a number" in error(
        check_tags, read_tagged_file(ud, tag_column=0)
    )


def test_self_instruct_seed_and_user_oriented_tasks():
    seed = read_chat(shared("self-instruct/seed_tasks.jsonl"))
    assert len(seed) == 175  # one instance per seed task
    assert seed[1] == [
        {
            "role": "user",
            "content": "What is the relation between the given pairs?\n\n"
            "Night : Day :: Right : Left",
        },
        {
            "role": "assistant",
            "content": "The relation between the given pairs is that they are opposites.",
        },
    ]
    # The expert-written set has the same {instruction, instances} shape, one instance each.
    user_oriented = read_chat(shared("self-instruct/user_oriented_instructions.jsonl"))
    assert len(user_oriented) == 252
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in seed + user_oriented)


def test_gsm8k_test_answers_end_with_the_final_number():
    chats = read_chat(shared("gsm8k/test.jsonl"))
    assert len(chats) == 1319
    assert all(re.search(r"\n#### -?[\d,.]+$", c[1]["content"]) for c in chats)


def test_dialogsum_dev_and_the_test_files_three_summaries():
    chats = read_chat(shared("dialogsum/dialogsum.dev.jsonl"))
    assert len(chats) == 500
    assert all(c[0]["content"].startswith("Summarize this dialogue:\n#Person1#:") for c in chats)
    # The test file has summary1..summary3 and no "summary": not a shape read_chat guesses at.
    test_file = shared("dialogsum/dialogsum.test.jsonl")
    assert "'summary1'" in error(read_chat, test_file)
