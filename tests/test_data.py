import io
import json

import pytest
import transformers

from cntinit import data, embedded
from cntinit.errors import CntinitError


def write(path, text, mode="w"):
    path.write_text(text) if mode == "w" else path.write_bytes(text)
    return path


def test_jsonl_text_and_messages(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    samples = data.read_samples(f)
    assert [s.content for s in samples] == ["one", [{"role": "user", "content": "hi"}]]
    assert samples[1].is_chat and samples[1].origin.endswith("a.jsonl:3")


def test_txt_lines_directory_order_and_max_samples(tmp_path):
    write(tmp_path / "b.txt", "first\n\nsecond\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.jsonl", '{"body": "third"}\n')
    write(tmp_path / "ignored.csv", "x,y\n")
    assert [s.content for s in data.read_samples(tmp_path, text_field="body")] == ["first", "second", "third"]
    assert [s.content for s in data.read_samples(tmp_path, text_field="body", max_samples=2)] == ["first", "second"]


def test_stdin_reads_jsonl(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "a"}\n{"text": "b"}\n'))
    assert [s.content for s in data.read_samples("-")] == ["a", "b"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("field.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"field.jsonl:2: no string field 'text'.*--text-field"),
        ("list.jsonl", '[1, 2]\n', r"list.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", r"no samples in"),
        ("data.csv", "a,b\n", r"neither .jsonl nor .txt"),
    ],
)
def test_bad_data_names_the_problem(tmp_path, name, content, message):
    with pytest.raises(CntinitError, match=message):
        data.read_samples(write(tmp_path / name, content))


def test_binary_and_non_utf8_files(tmp_path):
    with pytest.raises(CntinitError, match="looks binary"):
        data.read_samples(write(tmp_path / "x.txt", b"ab\x00cd", mode="b"))
    with pytest.raises(CntinitError, match="not UTF-8"):
        data.read_samples(write(tmp_path / "y.txt", "café\n".encode("latin-1"), mode="b"))
    with pytest.raises(CntinitError, match="does not exist"):
        data.read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CntinitError, match="holds no .jsonl or .txt"):
        data.read_samples(tmp_path / "emptydir")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(embedded.model_dir())


def test_tokenize_truncates_each_sample_and_packs_only_on_request(tokenizer):
    samples = [data.Sample("word " * 50, "x:1"), data.Sample("short one", "x:2")]
    each = data.tokenize(samples, tokenizer, seq_len=16)
    assert [len(s) for s in each] == [16, len(tokenizer("short one")["input_ids"])]
    assert each[0][0] == tokenizer.cls_token_id and each[0][-1] == tokenizer.sep_token_id  # truncated the tokenizer's way
    packed = data.tokenize(samples, tokenizer, seq_len=16, pack=True)
    total = sum(len(tokenizer(s.content)["input_ids"]) for s in samples)
    assert sum(len(s) for s in packed) == total and all(len(s) == 16 for s in packed[:-1])


def test_chat_messages_need_a_template(tokenizer):
    sample = data.Sample([{"role": "user", "content": "hello"}], "c.jsonl:4")
    with pytest.raises(CntinitError, match="c.jsonl:4: 'messages' needs a chat template"):
        data.tokenize([sample], tokenizer, seq_len=32)


def test_buckets_are_consecutive_and_batches_right_padded():
    seqs = [[1] * n for n in (3, 1, 4, 1, 5)]
    assert data.split_buckets(seqs, 2) == [seqs[:2], seqs[2:]]
    with pytest.raises(CntinitError, match="--buckets 6 is more than the 5 sequences"):
        data.split_buckets(seqs, 6)
    (ids, mask), (ids2, mask2), (ids3, _) = list(data.batches(seqs, 2, pad_id=9))
    assert ids.tolist() == [[1] * 5, [1, 1, 1, 1, 9]] and mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert mask2.sum().item() == 4 and ids3.shape == (1, 1)


def test_fingerprint_depends_on_content_only(tmp_path):
    a = data.read_samples(write(tmp_path / "a.txt", "x\ny\n"))
    b = data.read_samples(write(tmp_path / "b.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in "xy")))
    assert data.fingerprint(a) == data.fingerprint(b) != data.fingerprint(a[:1])


def test_zero_token_samples_are_skipped_with_a_warning(tokenizer, capsys):
    """A tokenizer that adds no special tokens turns whitespace-like text into no ids: such samples are left out, said so."""
    class NoSpecials:
        def __call__(self, text, add_special_tokens=True, **kwargs):
            return tokenizer(text, add_special_tokens=False, **kwargs)

    samples = [data.Sample(content, f"x:{i}") for i, content in enumerate(["Let there be light.", "\u200b", "Waters."])]
    sequences = data.tokenize(samples, NoSpecials(), seq_len=64)
    assert len(sequences) == 2 and all(sequences)
    assert "1 samples tokenize to zero tokens and were skipped" in capsys.readouterr().err
