"""Hostile data: malformed files and records are one LowraxError naming the file and line, or the record and
field; nothing trains on zero tokens or on a label outside the head."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowrax
from lowrax.train.config import DataSection
from lowrax.train.data import encode_all, load_records
from lowrax.train.records import read_record_file


@pytest.fixture(scope="module")
def tokenizer():
    return lowrax.load_tokenizer(None)


FILES = [
    ("empty.jsonl", b"", r"empty\.jsonl holds no records"),
    ("blank.jsonl", b"\n\n  \n", r"blank\.jsonl holds no records"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', r"bad\.jsonl:2: not valid JSON"),
    ("scalars.jsonl", b'{"text": "a"}\n5\n', r"scalars\.jsonl line 2: a record must be a JSON object of fields, got int 5"),
    ("lists.jsonl", b'["a", "b"]\n', r"lists\.jsonl line 1: a record must be a JSON object of fields, got list"),
    ("string.json", b'"just text"', r"string\.json holds a JSON str; expected a list of records"),
    ("mixed.json", b'[{"text": "a"}, 3]', r"mixed\.json item 2: a record must be a JSON object"),
    ("extra.csv", b"text,label\nhello,1\nworld,0,surprise\n", r"extra\.csv:3: 3 fields, but the header names 2"),
    ("short.csv", b"text,label\nhello\n", r"short\.csv:2: 1 fields, but the header names 2"),
    ("binary.jsonl", b'{"text": "\xff\xfe"}\n', r"binary\.jsonl is not UTF-8 text"),
    ("data.parquetx", b"x", r"unsupported extension '\.parquetx'"),
]


@pytest.mark.parametrize("name, content, expected", FILES, ids=[n for n, _, _ in FILES])
def test_malformed_data_files_name_the_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(lowrax.LowraxError, match=expected):
        load_records(DataSection(source=str(path)))


def test_a_missing_source_and_a_folder_of_other_files(tmp_path):
    with pytest.raises(lowrax.LowraxError, match="does not exist"):
        load_records(DataSection(source=str(tmp_path / "nope.jsonl")))


def test_csv_integer_columns_are_integers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",1\nbye,0\n')
    train, _ = load_records(DataSection(source=str(path), eval_fraction=0.0))
    assert sorted((r["text"], r["label"]) for r in train) == [("bye", 0), ("hello, world", 1)]


def test_a_bad_record_is_named_by_its_file_line_after_the_shuffle(tmp_path, tokenizer):
    """The train / evaluation split shuffles records; the error still names the line to open."""
    lines = [json.dumps({"prompt": f"q{i}", "response": "a"}) for i in range(40)]
    lines[26] = json.dumps({"prompt": "q", "response": ""})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataSection(source=str(path), format="prompt_response", eval_fraction=0.5)
    train, evaluation = load_records(cfg)
    split, what = (train, "training") if any(r["response"] == "" for r in train) else (evaluation, "evaluation")
    with pytest.raises(lowrax.LowraxError, match=rf"{what} pairs\.jsonl line 27 \(.*field 'response' must be"):
        encode_all(tokenizer, split, cfg, "causal_lm", what)


def test_csv_lines_are_counted_across_quoted_line_breaks(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",1\nok,0\nbad\n')
    with pytest.raises(lowrax.LowraxError, match=r"d\.csv:5: 1 fields"):
        read_record_file(path)
    path.write_text('text,label\n"two\nlines",1\nok,0\n')
    assert [r.origin for r in read_record_file(path)] == ["d.csv line 2", "d.csv line 4"]


RECORDS = [  # (task, format, record, expected)
    ("causal_lm", "prompt_response", {"prompt": "hi", "response": ""}, r"field 'response' must be a non-empty string, got ''"),
    ("causal_lm", "prompt_response", {"prompt": "hi", "response": None}, r"field 'response' must be a non-empty string, got None"),
    ("causal_lm", "prompt_response", {"prompt": 5, "response": "x"}, r"field 'prompt' must be a string, got 5"),
    ("causal_lm", "prompt_response", {"prompt": "hi"}, r"field 'response' is missing \(its fields: prompt\)"),
    ("causal_lm", "messages", {"messages": [{"role": "user", "content": "hi"}]}, r"field 'messages' has no assistant message: nothing to train on"),
    ("causal_lm", "messages", {"messages": [{"role": "robot", "content": "hi"}]}, r"field 'messages', message 1: expected \{\"role\": one of system, user, assistant, tool"),
    ("causal_lm", "messages", {"messages": [{"content": "hi"}]}, r"field 'messages', message 1: expected"),
    ("causal_lm", "messages", {"messages": [{"role": "user", "content": ["hi"]}]}, r"field 'messages', message 1: expected"),
    ("causal_lm", "messages", {"messages": []}, r"field 'messages' must be a non-empty list"),
    ("causal_lm", "messages", {"messages": "hi"}, r"field 'messages' must be a non-empty list"),
    ("causal_lm", "text", {"text": ""}, r"field 'text' must be a non-empty string"),
    ("causal_lm", "text", {"text": ["a"]}, r"field 'text' must be a non-empty string"),
    ("classification", "classification", {"text": "good", "label": "pos"}, r"field 'label' must be an integer class"),
    ("classification", "classification", {"text": "good", "label": -1}, r"field 'label' must be an integer class"),
    ("classification", "classification", {"text": "good", "label": 0.5}, r"field 'label' must be an integer class"),
    ("classification", "classification", {"text": "good", "label": True}, r"field 'label' must be an integer class"),
    ("classification", "classification", {"text": "good", "label": 7}, r"field 'label' must be an integer class in 0\.\.1 \(model\.num_labels=2\), got 7"),
    ("seq2seq", "seq2seq", {"input": "translate", "target": ""}, r"field 'target' must be a non-empty string"),
]


@pytest.mark.parametrize("task, fmt, record, expected", RECORDS, ids=[f"{f}-{i}" for i, (_, f, _, _) in enumerate(RECORDS)])
def test_bad_records_name_the_record_and_field(tokenizer, task, fmt, record, expected):
    good = {"prompt_response": {"prompt": "a", "response": "b"}, "messages": {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "text": {"text": "a"},
        "classification": {"text": "a", "label": 1}, "seq2seq": {"input": "a", "target": "b"}}[fmt]
    cfg = DataSection(format=fmt)
    with pytest.raises(lowrax.LowraxError, match=r"training record 2 \(.*\): " + expected):
        encode_all(tokenizer, [good, record], cfg, task, num_labels=2 if task == "classification" else None)


def test_prompts_that_fill_the_row_are_left_out_and_reported(tokenizer):
    long = {"prompt": "word " * 100, "response": "yes"}
    short = {"prompt": "a", "response": "b"}
    logged = []
    data = encode_all(tokenizer, [short, long, short], DataSection(format="prompt_response", seq_len=16),
                      "causal_lm", log=logged.append)
    assert len(data.ids) == 2
    assert logged == ["data: 1 of 3 training records have no trained token within data.seq_len=16 (the prompt "
                      "fills the row; the first is record 2) and are left out"]
    with pytest.raises(lowrax.LowraxError, match="no training record has a trained token within data.seq_len=16"):
        encode_all(tokenizer, [long], DataSection(format="prompt_response", seq_len=16), "causal_lm")


@pytest.mark.parametrize("chosen, rejected", [("", "no"), ("yes", "   "), ([{"role": "assistant", "content": ""}],
                                                                           [{"role": "assistant", "content": "no"}])])
def test_an_empty_preference_completion_is_refused(tokenizer, chosen, rejected):
    from lowrax.train.preference_data import encode_pairs

    prompt = "Q?" if isinstance(chosen, str) else [{"role": "user", "content": "Q?"}]
    with pytest.raises(lowrax.LowraxError, match="record 1: a completion is empty"):
        encode_pairs(tokenizer, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}],
                     DataSection(format="prompt_response"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=10),
                                            st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)),
                                                            max_size=3)), max_size=5)
                         .map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode())),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
def test_any_file_content_gives_records_or_one_named_error(tmp_path, content, suffix):
    """Arbitrary bytes in a data file: a list of records (dicts) or a LowraxError naming the file, never
    another exception."""
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    try:
        records = read_record_file(path)
    except lowrax.LowraxError as e:
        assert "data" in str(e) and "\n" not in str(e)
    else:
        assert records and all(isinstance(r, dict) for r in records)
