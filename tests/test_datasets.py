"""Calibration data as tables (parquet, arrow, csv, a JSON list, save_to_disk folders) and Hub dataset
ids from a test-built Hugging Face cache, through the `datasets` library: each gives the statistics
the same texts give as JSONL; and each way such data can be wrong is one line."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_hub import COMMIT_A, cache_repo

from cntinit import capture, records, runner
from cntinit.errors import CntinitError
from cntinit.storage.store import Store

from conftest import TEXTS


@pytest.fixture(autouse=True)
def own_hub_cache(tmp_path, monkeypatch):
    """Each test its own Hugging Face cache: repositories one test builds are not another's."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def texts_as(kind: str, folder: Path, texts=TEXTS, column: str = "text") -> str:
    """`texts` written as `kind`, in `folder`; the --data argument that reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({column: texts, "id": list(range(len(texts)))})
    if kind == "jsonl":
        (folder / "t.jsonl").write_text("".join(json.dumps({column: t}) + "\n" for t in texts))
        return str(folder / "t.jsonl")
    if kind == "parquet":
        pq.write_table(table, folder / "t.parquet")
        return str(folder / "t.parquet")
    if kind == "arrow":
        with pa.ipc.new_stream(folder / "t.arrow", table.schema) as stream:  # the format save_to_disk writes
            stream.write_table(table)
        return str(folder / "t.arrow")
    if kind == "csv":
        datasets.Dataset.from_dict(table.to_pydict()).to_csv(folder / "t.csv")
        return str(folder / "t.csv")
    if kind == "json":  # a list of records, not JSON lines
        (folder / "t.json").write_text(json.dumps([{column: t, "id": i} for i, t in enumerate(texts)]))
        return str(folder / "t.json")
    if kind == "saved":
        datasets.Dataset.from_dict(table.to_pydict()).save_to_disk(folder / "saved")
        return str(folder / "saved")
    if kind == "saved-splits":
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(table.to_pydict()),
                              "test": datasets.Dataset.from_dict({column: ["held out"], "id": [0]})}).save_to_disk(folder / "splits")
        return str(folder / "splits")
    if kind == "folder":  # a dataset repository downloaded to a folder of its own (hf download --local-dir)
        (folder / "repo" / "data").mkdir(parents=True)
        (folder / "repo" / "README.md").write_text("# calibration\n")
        pq.write_table(table, folder / "repo" / "data" / "train-00000-of-00001.parquet")
        pq.write_table(pa.table({column: ["held out"], "id": [0]}), folder / "repo" / "data" / "test-00000-of-00001.parquet")
        return str(folder / "repo")
    if kind == "hub":
        data = folder / "repo" / "data"
        data.mkdir(parents=True)
        pq.write_table(table, data / "train-00000-of-00001.parquet")
        pq.write_table(pa.table({column: ["held out"], "id": [0]}), data / "test-00000-of-00001.parquet")
        cache_repo(folder / "repo", "org/calib", COMMIT_A, kind="datasets")
        return "org/calib"
    raise ValueError(kind)


KINDS = ["parquet", "arrow", "csv", "json", "saved", "saved-splits", "folder", "hub"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_table_gives_the_statistics_of_the_same_texts_in_jsonl(tiny, tmp_path, kind):
    reference = Store(capture(tiny["llama"], texts_as("jsonl", tmp_path / "j"), tmp_path / "ref", targets="q_proj,down_proj"))
    table = Store(capture(tiny["llama"], texts_as(kind, tmp_path / kind), tmp_path / "s", targets="q_proj,down_proj"))
    assert table.manifest["data"]["fingerprint"] == reference.manifest["data"]["fingerprint"]
    assert table.manifest["data"]["samples"] == len(TEXTS)
    for key in reference.keys:
        for name, tensor in reference.tensors(key).items():
            assert torch.equal(table.tensors(key)[name], tensor), (key, name)
    data = table.manifest["data"]
    if kind in ("saved-splits", "folder", "hub"):
        assert data["split"] == "train"
    if kind == "hub":
        assert data["repo"] == "org/calib" and data["revision"] == COMMIT_A


def test_a_split_is_chosen_by_name(tmp_path):
    for kind in ("saved-splits", "folder", "hub"):
        source = texts_as(kind, tmp_path / kind)
        assert [s.content for s in records.read(source, split="test").samples] == ["held out"]
        with pytest.raises(CntinitError, match=r"has no split validation: give one of (train, test|test, train)"):
            records.read(source, split="validation")


def configs_repo(folder: Path) -> str:
    """A Hub dataset with two configs (its README's `configs:`), the GLUE way: `a` (train) and `b` (train, validation)."""
    for config, split, texts in (("a", "train", TEXTS[:3]), ("b", "train", TEXTS[3:6]), ("b", "validation", TEXTS[6:8])):
        (folder / "repo" / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts}), folder / "repo" / config / f"{split}-00000-of-00001.parquet")
    (folder / "repo" / "README.md").write_text(
        "---\nconfigs:\n- config_name: a\n  data_files:\n  - split: train\n    path: a/train-*.parquet\n"
        "- config_name: b\n  data_files:\n  - split: train\n    path: b/train-*.parquet\n  - split: validation\n"
        "    path: b/validation-*.parquet\n---\n# two configs\n")
    cache_repo(folder / "repo", "org/glue-like", COMMIT_A, kind="datasets")
    return "org/glue-like"


def test_a_config_is_chosen_by_name(tiny, tmp_path):
    source = configs_repo(tmp_path)
    assert [s.content for s in records.read(source, config="b", split="validation").samples] == TEXTS[6:8]
    assert [s.content for s in records.read(source, config="a").samples] == TEXTS[:3]
    with pytest.raises(CntinitError, match=r"^org/glue-like has several configs: pick one with --data-config \(a, b\)"):
        records.read(source)
    with pytest.raises(CntinitError, match=r"^org/glue-like has no config c: give one of a, b with --data-config"):
        records.check(source, config="c")
    with pytest.raises(CntinitError, match=r"^--data-config b picks a config of a dataset repository, and .*t.parquet is a single table"):
        records.read(texts_as("parquet", tmp_path / "p"), config="b")
    with pytest.raises(CntinitError, match=r"^--data-config picks a config of a dataset, and .*t.jsonl is read line by line"):
        records.read(texts_as("jsonl", tmp_path / "j"), config="b")
    store = Store(capture(tiny["llama"], source, tmp_path / "s", targets="v_proj", data_config="b", split="validation"))
    assert store.manifest["data"]["config"] == "b" and store.manifest["data"]["split"] == "validation"
    assert store.manifest["data"]["samples"] == 2


def test_a_drawn_sample_is_the_same_records_from_every_source(tmp_path):
    drawn = {kind: [s.content for s in records.read(texts_as(kind, tmp_path / kind), max_samples=5, shuffle_seed=3).samples]
             for kind in ("jsonl", "parquet", "hub")}
    assert drawn["jsonl"] == drawn["parquet"] == drawn["hub"] and len(set(drawn["jsonl"])) == 5
    assert drawn["jsonl"] != TEXTS[:5] and set(drawn["jsonl"]) <= set(TEXTS)
    other = [s.content for s in records.read(texts_as("jsonl", tmp_path / "o"), max_samples=5, shuffle_seed=4).samples]
    assert other != drawn["jsonl"]
    whole = [s.content for s in records.read(texts_as("parquet", tmp_path / "w"), shuffle_seed=3).samples]
    assert sorted(whole) == sorted(TEXTS) and whole != TEXTS
    assert [s.content for s in records.read(texts_as("parquet", tmp_path / "f"), max_samples=2).samples] == TEXTS[:2]


def test_the_cache_keys_on_the_records_used(tiny, tmp_path):
    source = texts_as("parquet", tmp_path / "p")
    first, hit = runner.cached_capture(tiny["llama"], source, targets="v_proj", cache_dir=tmp_path / "c", max_samples=6, shuffle_seed=0)
    again, hit_again = runner.cached_capture(tiny["llama"], source, targets="v_proj", cache_dir=tmp_path / "c", max_samples=6,
                                             shuffle_seed=0)
    other, hit_other = runner.cached_capture(tiny["llama"], source, targets="v_proj", cache_dir=tmp_path / "c", max_samples=6,
                                             shuffle_seed=1)
    assert not hit and hit_again and again == first and not hit_other and other != first
    assert Store(first).manifest["capture"]["shuffle_seed"] == 0
    assert Store(first).manifest["data"]["fingerprint"] != Store(other).manifest["data"]["fingerprint"]


def test_folders_of_images_or_lines_are_not_tables(tmp_path):
    """A pipeline's image folder with a stray JSON file, or JSONL beside a parquet file, is not read as a dataset."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "dog.png").write_bytes(b"\x89PNG")
    (tmp_path / "photos" / "notes.json").write_text("{}")
    records.check(tmp_path / "photos")  # left to the image feed
    texts_as("parquet", tmp_path / "mixed")
    texts_as("jsonl", tmp_path / "mixed")
    assert [s.content for s in records.read(tmp_path / "mixed").samples] == TEXTS  # the JSONL, read line by line


def test_messages_and_prompt_completion_columns(tmp_path):
    chats = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "light"}]]
    pq.write_table(pa.table({"messages": chats}), tmp_path / "chat.parquet")
    assert records.read(tmp_path / "chat.parquet").samples[0].content == chats[0]
    pq.write_table(pa.table({"prompt": ["Let there "], "completion": ["be light."]}), tmp_path / "pc.parquet")
    sample = records.read(tmp_path / "pc.parquet").samples[0]
    assert sample.content == "Let there be light." and sample.prompt == "Let there "
    pq.write_table(pa.table({"body": ["in a column of another name"]}), tmp_path / "body.parquet")
    assert records.read(tmp_path / "body.parquet", field="body").samples[0].content == "in a column of another name"


@pytest.mark.parametrize("case, message", [
    ("no column", r"^.*t.parquet has no column 'text', 'messages' or 'prompt' \+ 'completion': pass --field NAME \(its columns: body, id\)"),
    ("named column", r"^.*t.parquet has no column 'txt': pass --field NAME \(its columns: text, id\)"),
    ("numbers", r"^column 'id' of .*t.parquet holds int64, not text: pass --field with a text column"),
    ("empty", r"^.*t.parquet is empty \(0 rows\)"),
    ("lying parquet", r"^data file .*fake.parquet is not a parquet file \(its first bytes say otherwise\)"),
    ("lying json", r"^data file .*fake.json is not a json file"),
    ("split of a file", r"^--split test: .*t.parquet is one file, a single split: leave out --split"),
    ("split of jsonl", r"^--split picks a split of a dataset, and .*t.jsonl is read line by line"),
    ("no train split", r"^.*splits has no train split: pick one with --split \((a, b|b, a)\)"),
    ("missing dataset", r"^org/none is neither a local path nor a dataset in the Hugging Face cache"),
])
def test_bad_tables_are_one_line(tmp_path, case, message):
    field, split = "text", None
    if case == "no column":
        source = texts_as("parquet", tmp_path, column="body")
    elif case == "named column":
        source, field = texts_as("parquet", tmp_path), "txt"
    elif case == "numbers":
        source, field = texts_as("parquet", tmp_path), "id"
    elif case == "empty":
        source = texts_as("parquet", tmp_path, texts=[])
    elif case == "lying parquet":
        source = tmp_path / "fake.parquet"
        source.write_text("text\nhello\n")
    elif case == "lying json":
        source = tmp_path / "fake.json"
        source.write_bytes(b"PAR1 binary")
    elif case == "split of a file":
        source, split = texts_as("parquet", tmp_path), "test"
    elif case == "split of jsonl":
        source, split = texts_as("jsonl", tmp_path), "test"
    elif case == "no train split":
        source = tmp_path / "splits"
        datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": ["x"]}) for name in ("a", "b")}).save_to_disk(source)
    else:
        source = "org/none"
    with pytest.raises(CntinitError, match=message):
        records.read(source, field=field, split=split)


def test_without_the_datasets_library_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    source = texts_as("parquet", tmp_path)
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CntinitError, match=r"needs the datasets library: pip install 'cntinit\[datasets\]' \(or give .jsonl or .txt\)"):
        records.read(source)
    assert [s.content for s in records.read(texts_as("jsonl", tmp_path / "j")).samples] == TEXTS  # JSONL needs nothing


PROBE = ("import sys, runpy; sys.argv = ['cntinit'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('cntinit', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
         "print('torch' in sys.modules, 'transformers' in sys.modules, code, file=sys.stderr)")


@pytest.mark.parametrize("case", ["model path", "model id", "data path", "column", "recipe model", "recipe data"])
def test_mistyped_inputs_are_refused_before_torch_loads(tiny, tmp_path, case):
    data, model, extra = texts_as("parquet", tmp_path), tiny["llama"], []
    if case.startswith("recipe"):
        recipe = {"model": "org/no-model" if case == "recipe model" else str(model), "capture": {"data": str(tmp_path / "none.jsonl")},
                  "solves": [{"mode": "cnt-s"}], "out": str(tmp_path / "out")}
        (tmp_path / "r.yaml").write_text(json.dumps(recipe))
        done = subprocess.run([sys.executable, "-c", PROBE, "run", str(tmp_path / "r.yaml")], capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert lines[-1] == "False False 2" and lines[0].startswith("error: recipe key " + case.split()[1].replace("data", "capture.data")), \
            done.stderr
        return
    if case == "model path":
        model = str(tmp_path / "no-model")
    elif case == "model id":
        model = "org/no-model"
    elif case == "data path":
        data = str(tmp_path / "no-data.jsonl")
    else:
        extra = ["--field", "body"]
    done = subprocess.run([sys.executable, "-c", PROBE, "capture", model, "-d", data, "-o", str(tmp_path / "s"), *extra],
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "False False 2", done.stderr
    assert lines[0].startswith("error: ") and len(lines) == 2


def test_the_command_line_takes_ids_splits_fields_and_draws(tiny, tmp_path, capsys):
    """As a cluster user types it: a model and a dataset by id, a split, a column, N records drawn with a seed."""
    from conftest import run
    cache_repo(Path(tiny["llama"]), "org/tiny-cli", COMMIT_A)
    texts_as("hub", tmp_path / "d", column="body")
    code, out, err = run(capsys, "capture", "org/tiny-cli", "--revision", "main", "-d", "org/calib", "--split", "train",
                         "--field", "body", "--samples", "5", "--shuffle-seed", "1", "-t", "v_proj", "-o", tmp_path / "s")
    assert code == 0, err
    manifest = Store(tmp_path / "s").manifest
    assert manifest["data"]["samples"] == 5 and manifest["data"]["split"] == "train" and manifest["capture"]["shuffle_seed"] == 1
    assert manifest["model"]["repo"] == "org/tiny-cli"
    code, out, _ = run(capsys, "inspect", tmp_path / "s")
    assert code == 0 and f"at org/tiny-cli@{COMMIT_A[:12]}" in out and "data   org/calib (split train): 5 samples" in out
    code, _, err = run(capsys, "solve", "--revision", "v2", "-m", "lora")
    assert code == 2 and "--revision picks a commit of a Hub id --model: add --model org/name" in err
    code, _, err = run(capsys, "capture", tiny["llama"], "-d", "org/calib", "--split", "dev", "-o", tmp_path / "t")
    assert code == 2 and "org/calib has no split dev: give one of" in err


def test_a_recipe_names_a_hub_model_at_a_revision_and_a_hub_dataset_split(tiny, tmp_path):
    from cntinit import recipe
    cache_repo(Path(tiny["llama"]), "org/tiny-recipe", COMMIT_A, ref="v1")
    texts_as("hub", tmp_path / "d")
    plan = recipe.check({"model": "org/tiny-recipe", "revision": "v1", "targets": "v_proj", "out": str(tmp_path / "out"),
                         "capture": {"data": "org/calib", "split": "test"}, "solves": [{"mode": "cnt-s", "rank": 1}],
                         "exports": [{"format": "peft"}]})
    summary = runner.run(plan, cache_dir=tmp_path / "c")
    stats = next(Path(row["path"]) for row in summary["stages"] if row["stage"] == "capture")
    manifest = Store(stats).manifest
    assert manifest["data"]["split"] == "test" and manifest["data"]["samples"] == 1 and manifest["model"]["revision"] == COMMIT_A
    config = json.loads((Path(summary["exports"][0]) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-recipe" and config["revision"] == COMMIT_A
    bad = recipe.check({"model": "org/tiny-recipe", "revision": "v7", "out": str(tmp_path / "o2"), "solves": [{"mode": "lora"}]})
    with pytest.raises(CntinitError, match=r"^recipe key model: org/tiny-recipe is in the Hugging Face cache, but not at revision v7"):
        runner.run(bad, cache_dir=tmp_path / "c")
