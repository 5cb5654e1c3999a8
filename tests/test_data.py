import io
import json

import pytest
import transformers

from cntinit import embedded, records
from cntinit.capture.feeds import samples as data
from cntinit.errors import CntinitError


def read_samples(source, **options):
    return records.read(source, **options).samples


def write(path, text, mode="w"):
    path.write_text(text) if mode == "w" else path.write_bytes(text)
    return path


def test_jsonl_text_and_messages(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "one"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    samples = read_samples(f)
    assert [s.content for s in samples] == ["one", [{"role": "user", "content": "hi"}]]
    assert samples[1].is_chat and samples[1].origin.endswith("a.jsonl:3")


def test_txt_lines_directory_order_and_max_samples(tmp_path):
    write(tmp_path / "b.txt", "first\n\nsecond\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "c.jsonl", '{"body": "third"}\n')
    write(tmp_path / "ignored.csv", "x,y\n")
    assert [s.content for s in read_samples(tmp_path, field="body")] == ["first", "second", "third"]
    assert [s.content for s in read_samples(tmp_path, field="body", max_samples=2)] == ["first", "second"]


def stdin(raw: bytes):
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8")


def test_stdin_reads_jsonl(monkeypatch):
    monkeypatch.setattr("sys.stdin", stdin(b'{"text": "a"}\n{"text": "b"}\n'))
    assert [s.content for s in read_samples("-")] == ["a", "b"]


def test_stdin_lines_are_named_as_such(monkeypatch):
    monkeypatch.setattr("sys.stdin", stdin(b'{"text": "a"}\n{"body": "b"}\n'))
    with pytest.raises(CntinitError, match=r"^stdin line 2: no string field 'text'"):  # it said `<stdin>.jsonl:2`
        read_samples("-")
    monkeypatch.setattr("sys.stdin", stdin(b"plain words\n"))
    with pytest.raises(CntinitError, match=r"^stdin line 1: plain text, not JSON: send JSONL"):
        read_samples("-")


def test_closed_or_non_utf8_stdin_is_named(monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # `cntinit capture --data - 0<&-`
    with pytest.raises(CntinitError, match="stdin is closed: pipe the data in"):
        read_samples("-")
    monkeypatch.setattr("sys.stdin", stdin('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1")))
    with pytest.raises(CntinitError, match="stdin line 2 is not UTF-8"):
        read_samples("-")


def test_only_newlines_end_lines(tmp_path):
    """str.splitlines() also splits at U+2028, U+0085 and friends, which JSON strings may hold raw."""
    jsonl = write(tmp_path / "a.jsonl", '{"text": "one\u2028two"}\r\n{"text": "three\x85four"}\n', mode="w")
    assert [s.content for s in read_samples(jsonl)] == ["one\u2028two", "three\x85four"]
    txt = write(tmp_path / "b.txt", "six\u2029seven\neight\n")
    assert [s.content for s in read_samples(txt)] == ["six\u2029seven", "eight"]


def test_a_pipe_is_refused_not_waited_on(tiny, tmp_path):
    """A FIFO named calib.jsonl used to block the capture forever."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "calib.jsonl"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "cntinit", "capture", str(tiny["llama"]), "--data", str(fifo), "-o", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a regular file (a pipe or a device)" in done.stderr


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("field.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"field.jsonl:2: no string field 'text'.*--field"),
        ("list.jsonl", '[1, 2]\n', r"list.jsonl:1: expected a JSON object"),
        ("empty.jsonl", "\n\n", r"no samples in"),
        ("data.tsv", "a\tb\n", r"neither .jsonl or .txt nor a table"),
        ("plain.jsonl", "In the beginning\n", r"plain.jsonl:1: plain text, not JSON: a .txt file takes one sample per line"),
        ("deep.jsonl", "[" * 200_000 + "]" * 200_000 + "\n", r"deep.jsonl:1: not valid JSON \(nested deeper than JSON can be read\)"),
        ("digits.jsonl", '{"text": "a", "n": ' + "7" * 100_000 + "}\n", r"digits.jsonl:1: not valid JSON \(Exceeds the limit"),
        ("roleless.jsonl", '{"messages": [{"content": "hi"}]}\n', r"roleless.jsonl:1: message 0 has no string 'role'"),
        ("nested.jsonl", '{"messages": [{"role": "user", "content": {"text": "hi"}}]}\n',
         r"nested.jsonl:1: message 0's content is neither text nor a list of typed parts"),
        ("notdict.jsonl", '{"messages": ["hi"]}\n', r"notdict.jsonl:1: message 0 is not a JSON object"),
        ("prompted.jsonl", '{"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "x"}]}\n',
         r"prompted.jsonl:1: message 0 has no content"),
    ],
)
def test_bad_data_names_the_problem(tmp_path, name, content, message):
    with pytest.raises(CntinitError, match=message):
        read_samples(write(tmp_path / name, content))


def test_binary_and_non_utf8_files(tmp_path):
    with pytest.raises(CntinitError, match="looks binary"):
        read_samples(write(tmp_path / "x.txt", b"ab\x00cd", mode="b"))
    with pytest.raises(CntinitError, match="not UTF-8"):
        read_samples(write(tmp_path / "y.txt", "café\n".encode("latin-1"), mode="b"))
    with pytest.raises(CntinitError, match="does not exist"):
        read_samples(tmp_path / "missing.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CntinitError, match="holds no .jsonl or .txt"):
        read_samples(tmp_path / "emptydir")


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(embedded.model_dir())


def test_tokenize_truncates_each_sample_and_packs_only_on_request(tokenizer):
    samples = [records.Sample("word " * 50, "x:1"), records.Sample("short one", "x:2")]
    each = data.tokenize(samples, tokenizer, seq_len=16)
    assert [len(s) for s in each] == [16, len(tokenizer("short one")["input_ids"])]
    assert each[0][0] == tokenizer.cls_token_id and each[0][-1] == tokenizer.sep_token_id  # truncated the tokenizer's way
    packed = data.tokenize(samples, tokenizer, seq_len=16, pack=True)
    total = sum(len(tokenizer(s.content)["input_ids"]) for s in samples)
    assert sum(len(s) for s in packed) == total and all(len(s) == 16 for s in packed[:-1])


def test_chat_messages_need_a_template(tokenizer):
    sample = records.Sample([{"role": "user", "content": "hello"}], "c.jsonl:4")
    with pytest.raises(CntinitError, match="c.jsonl:4: 'messages' needs a chat template"):
        data.tokenize([sample], tokenizer, seq_len=32)


def test_buckets_are_consecutive_and_batches_right_padded():
    seqs = [[1] * n for n in (3, 1, 4, 1, 5)]
    assert data.split_buckets(seqs, 2) == [seqs[:2], seqs[2:]]
    with pytest.raises(CntinitError, match="--buckets 6 is more than the 5 sequences"):
        data.split_buckets(seqs, 6)
    (ids, mask, targets), (ids2, mask2, _), (ids3, _, _) = list(data.batches(seqs, 2, pad_id=9))
    assert ids.tolist() == [[1] * 5, [1, 1, 1, 1, 9]] and mask.tolist() == [[1] * 5, [1, 1, 1, 1, 0]]
    assert mask2.sum().item() == 4 and ids3.shape == (1, 1) and targets is None  # no prompts: every real token is a target


def test_fingerprint_depends_on_content_only(tmp_path):
    a = read_samples(write(tmp_path / "a.txt", "x\ny\n"))
    b = read_samples(write(tmp_path / "b.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in "xy")))
    assert records.fingerprint(a) == records.fingerprint(b) != records.fingerprint(a[:1])


def test_zero_token_samples_are_skipped_with_a_warning(tokenizer, capsys):
    """A tokenizer that adds no special tokens turns whitespace-like text into no ids: such samples are left out, said so."""
    class NoSpecials:
        def __call__(self, text, add_special_tokens=True, **kwargs):
            return tokenizer(text, add_special_tokens=False, **kwargs)

    samples = [records.Sample(content, f"x:{i}") for i, content in enumerate(["Let there be light.", "\u200b", "Waters."])]
    sequences = data.tokenize(samples, NoSpecials(), seq_len=64)
    assert len(sequences) == 2 and all(sequences)
    assert "1 samples tokenize to zero tokens and were skipped" in capsys.readouterr().err


class Counting:
    """A tokenizer that records how many characters it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, text, **kwargs):
        self.seen.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("shape", ["words", "endless word", "dropped characters", "long word at the cut"])
def test_long_samples_are_cut_before_tokenizing_exactly_as_truncation_would(tokenizer, shape):
    """A 20 MB line used to be tokenized whole (3.3 GB, 99 s) to keep its first --seq-len tokens."""
    import random

    rng = random.Random(0)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "épsilon", "z"]) for _ in range(60_000))
    text = {"words": words, "endless word": "x" * 200_000,
            "dropped characters": "\x01" * 200_000 + words,  # BERT's normalizer removes control characters
            "long word at the cut": words[:3000] + "y" * 5000 + words}[shape]
    counting = Counting(tokenizer)
    got = data.tokenize([records.Sample(text, "x:1")], counting, seq_len=64)
    assert got == [tokenizer(text, truncation=True, max_length=64)["input_ids"]]
    if shape == "words":
        assert max(counting.seen) < 20_000  # not the 360,000 characters


def test_long_chat_and_bpe_samples_are_exact(smollm2):
    bpe = transformers.AutoTokenizer.from_pretrained(smollm2)
    text = " ".join(["the quick brown fox", "jumps", "über", "lazy dogs"] * 20_000)
    messages = [{"role": "user", "content": text}]
    got = data.tokenize([records.Sample(text, "x:1"), records.Sample(messages, "x:2")], bpe, seq_len=100)
    rendered = bpe.apply_chat_template(messages, tokenize=False)
    assert got == [bpe(text, truncation=True, max_length=100)["input_ids"],
                   bpe(rendered, add_special_tokens=False, truncation=True, max_length=100)["input_ids"]]


def test_an_endless_word_is_tokenized_no_further_than_a_bound(tokenizer, capsys):
    """A 200 MB line holding one word, taken whole by the tokenizer, aborted the process (signal 6): a
    sample is never tokenized past the bound, and a warning says which samples were cut there."""
    text = "ab" * 3_000_000
    counting = Counting(tokenizer)
    got = data.tokenize([records.Sample(text, "x.jsonl:1"), records.Sample("Let there be light.", "x.jsonl:2")], counting, seq_len=16)
    assert max(counting.seen) <= data.CUT_FLOOR
    assert got[0] == tokenizer(text[:data.CUT_FLOOR], truncation=True, max_length=16)["input_ids"]
    assert got[1] == tokenizer("Let there be light.")["input_ids"]
    assert "1 samples (e.g. x.jsonl:1) run past 1,048,576 characters without giving --seq-len tokens" in capsys.readouterr().err


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Windows tools start UTF-8 files with a byte-order mark; a .jsonl so written was refused as plain text."""
    jsonl = write(tmp_path / "bom.jsonl", b"\xef\xbb\xbf" + '{"text": "first"}\n{"text": "second"}\n'.encode(), mode="b")
    txt = write(tmp_path / "bom.txt", b"\xef\xbb\xbfone\ntwo\n", mode="b")
    assert [s.content for s in read_samples(jsonl)] == ["first", "second"]
    assert [s.content for s in read_samples(txt)] == ["one", "two"]
