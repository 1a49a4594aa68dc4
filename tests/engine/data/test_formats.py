"""Data users bring: chat (loss on assistant turns, checked token by token), text, Parquet and
save_to_disk directories; bad data fails the task naming the file and the line or row."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.data import CHATML, CONVO, data_path

from muxtune.api.finetunetask import DatasetSpec
from muxtune.engine.data.dataset import IGNORE, DatasetError, load_dataset
from muxtune.engine.data.datafile import DataLimits

@pytest.fixture(scope="module")
def tok(tiny_backbone_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_backbone_dir)


def _spec(path: Path, **kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"path": data_path(path), "maxSeqLen": 512, **kw})


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_chat_loss_falls_on_assistant_turns_token_by_token(tmp_path, tok, data_root):
    f = _jsonl(tmp_path / "chat.jsonl", [CONVO])
    data = load_dataset(_spec(f, format="chat", chatTemplate=CHATML), tok, data_root)
    (ex,) = data.examples
    text = tok.decode(list(ex.input_ids))
    rendered = tok.apply_chat_template(CONVO["messages"], chat_template=CHATML, tokenize=False)
    assert text == rendered  # the template, tokenised whole
    # the targets, decoded in runs, are exactly the two assistant turns with their end markers
    trained = [i for i, t in enumerate(ex.targets) if t != IGNORE]
    runs, run = [], [trained[0]]
    for i in trained[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    assert [tok.decode([ex.targets[i] for i in r]) for r in runs] == ["hello<|im_end|>\n", "ciao<|im_end|>\n"]
    # each target is the next input token (position i predicts token i+1)
    assert all(ex.targets[i] == ex.input_ids[i + 1] for i in trained)
    # every other token (system, user turns, the assistant header) carries no loss
    for i, t in enumerate(ex.targets):
        if i not in trained:
            assert t == IGNORE
    assert data.chat_template == CHATML


def test_chat_without_template_is_a_clear_error(tmp_path, tok, data_root):
    f = _jsonl(tmp_path / "chat.jsonl", [CONVO])
    assert not tok.chat_template
    with pytest.raises(DatasetError, match="no chat template; set dataset.chatTemplate"):
        load_dataset(_spec(f, format="chat"), tok, data_root)


@pytest.mark.parametrize("row,why", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "message 0: role must be"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "message 0: content"),
    ({"prompt": "p"}, "'messages' must be"),
])
def test_bad_chat_rows_name_the_line(tmp_path, tok, data_root, row, why):
    f = _jsonl(tmp_path / "chat.jsonl", [CONVO, row])
    with pytest.raises(DatasetError) as e:
        load_dataset(_spec(f, format="chat", chatTemplate=CHATML), tok, data_root)
    assert f"{data_path(f)}:2: " in str(e.value) and why in str(e.value)


def test_text_trains_every_token_and_splits_long_documents(tmp_path, tok, data_root):
    doc = "abcdefghij" * 5  # 50 byte tokens + <s> + </s> = 52
    f = _jsonl(tmp_path / "text.jsonl", [{"text": doc}, {"body": "x"}])
    with pytest.raises(DatasetError, match=f"{data_path(f)}:2: the text field must be a string"):
        load_dataset(_spec(f, format="text"), tok, data_root)
    _jsonl(f, [{"text": doc}])
    data = load_dataset(_spec(f, format="text", maxSeqLen=20), tok, data_root)
    assert [len(ex.input_ids) for ex in data.examples] == [20, 20, 12]
    ids = [i for ex in data.examples for i in ex.input_ids]
    assert ids == [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for ex in data.examples:
        assert list(ex.targets) == list(ex.input_ids[1:]) + [IGNORE]


def _rows():
    return [{"prompt": f"q{i}: ", "completion": f"a{i}"} for i in range(6)]


def test_parquet_prompt_completion_equals_jsonl(tmp_path, tok, data_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows()), tmp_path / "d.parquet")
    j = _jsonl(tmp_path / "d.jsonl", _rows())
    a = load_dataset(_spec(tmp_path / "d.parquet", format="parquet"), tok, data_root)
    b = load_dataset(_spec(j), tok, data_root)
    assert a.examples == b.examples and len(a.examples) == 6


def test_parquet_chat_rows_and_bad_rows(tmp_path, tok, data_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([CONVO, CONVO]), tmp_path / "c.parquet")
    data = load_dataset(_spec(tmp_path / "c.parquet", format="parquet", rows="chat", chatTemplate=CHATML), tok, data_root)
    j = load_dataset(_spec(_jsonl(tmp_path / "c.jsonl", [CONVO]), format="chat", chatTemplate=CHATML), tok, data_root)
    assert data.examples == j.examples * 2
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(DatasetError, match=r"bad.parquet: row 2: missing string field\(s\) completion"):
        load_dataset(_spec(tmp_path / "bad.parquet", format="parquet"), tok, data_root)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="junk.parquet: not a readable Parquet file"):
        load_dataset(_spec(tmp_path / "junk.parquet", format="parquet"), tok, data_root)


def test_save_to_disk_directory_and_its_confinement(tmp_path, tok, data_root):
    import datasets

    datasets.Dataset.from_list(_rows()).save_to_disk(str(tmp_path / "saved"))
    ref = load_dataset(_spec(_jsonl(tmp_path / "d.jsonl", _rows())), tok, data_root)
    assert load_dataset(_spec(tmp_path / "saved", format="hf_disk"), tok, data_root).examples == ref.examples
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows()), "test": datasets.Dataset.from_list(_rows()[:1])}
                         ).save_to_disk(str(tmp_path / "dict"))
    assert load_dataset(_spec(tmp_path / "dict", format="hf_disk"), tok, data_root).examples == ref.examples

    # a data file swapped for a symlink to another tenant's file is refused before datasets reads it
    outside = tmp_path / "other-tenant"
    datasets.Dataset.from_list([{"prompt": "secret", "completion": "x"}]).save_to_disk(str(outside))
    arrow = next((tmp_path / "saved").glob("data-*.arrow"))
    arrow.unlink()
    os.symlink(next(outside.glob("data-*.arrow")), arrow)
    with pytest.raises(DatasetError, match="is not a regular file"):
        load_dataset(_spec(tmp_path / "saved", format="hf_disk"), tok, data_root)
    # state.json naming a file outside the directory
    state = json.loads((outside / "state.json").read_text())
    state["_data_files"] = [{"filename": "../saved/" + arrow.name}]
    (outside / "state.json").write_text(json.dumps(state))
    with pytest.raises(DatasetError, match="outside its directory"):
        load_dataset(_spec(outside, format="hf_disk"), tok, data_root)
    # the size cap covers the directory's data files
    with pytest.raises(DatasetError, match="dataset size cap"):
        load_dataset(_spec(tmp_path / "dict", format="hf_disk"), tok, data_root, DataLimits(max_file_bytes=100))
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(_spec(tmp_path / "d.jsonl", format="hf_disk"), tok, data_root)


def test_validation_split_holds_records_out(tmp_path, tok, data_root):
    rows = [{"prompt": f"q{i}: ", "completion": f"a{i}"} for i in range(20)]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    full = load_dataset(_spec(f), tok, data_root)
    a = load_dataset(_spec(f, validationSplit=0.25), tok, data_root, seed=3)
    b = load_dataset(_spec(f, validationSplit=0.25), tok, data_root, seed=3)
    assert len(a.validation) == 5 and len(a.examples) == 15 and a.records == 20
    assert a.validation == b.validation and a.examples == b.examples  # the same records every run
    assert sorted(map(str, a.validation + a.examples)) == sorted(map(str, full.examples))  # a partition
    v = _jsonl(tmp_path / "v.jsonl", rows[:3])
    c = load_dataset(_spec(f, validationPath=data_path(v)), tok, data_root)
    assert c.examples == full.examples and c.validation == full.examples[:3]
    _jsonl(v, ["{oops"])
    with pytest.raises(DatasetError, match=r"dataset.validationPath: .*v.jsonl:1: not valid JSON"):
        load_dataset(_spec(f, validationPath=data_path(v)), tok, data_root)
