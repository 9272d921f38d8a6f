"""``--data`` layouts beyond a plain image folder (privlora.data.sources): Hugging Face ``save_to_disk``
folders and the local cache, imagefolder ``metadata.jsonl`` / ``metadata.csv``, kohya ``.caption`` /
``.txt`` sidecars and ``N_name`` repeat folders, and the column options. Every format is built for real
in ``tmp_path`` (``datasets`` writes its own folders) and read back through the public loaders."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import FAST, assert_one_line_error, run_cli
from privlora.data import hf_sources
from privlora.data.folder import load_folder, load_listing
from privlora.data.sources import Columns, read_source
from privlora.data.splits import make_splits
from privlora.data.text import load_text_dataset
from privlora.errors import UserError

R = 16


def _image(value: int) -> Image.Image:
    """A flat image whose value identifies it after decoding (value/127.5 − 1 in every pixel)."""
    return Image.fromarray(np.full((R, R, 3), value, dtype=np.uint8))


def _value(pixels: Any) -> int:
    return round((float(pixels.mean()) + 1.0) * 127.5)


IMAGE_TEXT = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}


def _save_to_disk(path: Path, columns: dict[str, list[Any]], features: dict[str, Any],
                  splits: dict[str, dict[str, list[Any]]] | None = None) -> None:
    """A real ``Dataset.save_to_disk`` folder (``DatasetDict``'s when ``splits`` is given); ``features`` in
    the JSON form ``dataset_info.json`` holds. Without ``datasets``, the same layout written with pyarrow
    (checked against datasets 5.0's own output), so the pyarrow reader is still tested."""
    try:
        import datasets
    except ImportError:
        _arrow_save_to_disk(path, columns, features, splits)
        return
    feats = datasets.Features.from_dict(features)

    def build(data: dict[str, list[Any]]) -> Any:
        try:
            return datasets.Dataset.from_dict(data, features=feats)
        except Exception as e:  # datasets 5.0 cannot fingerprint tables of pyarrow ≥ 25 (MonthDayNano)
            if "MonthDayNano" not in str(e):
                raise
            from datasets.table import InMemoryTable

            table = InMemoryTable.from_pydict(feats.encode_batch(data), schema=feats.arrow_schema)
            return datasets.Dataset(table, info=datasets.DatasetInfo(features=feats), fingerprint=path.name)

    if splits is None:
        build(columns).save_to_disk(str(path))
    else:
        datasets.DatasetDict({name: build(data) for name, data in splits.items()}).save_to_disk(str(path))


def _arrow_save_to_disk(path: Path, columns: dict[str, list[Any]], features: dict[str, Any],
                        splits: dict[str, dict[str, list[Any]]] | None) -> None:
    pa = pytest.importorskip("pyarrow", reason="needs datasets or pyarrow to write a save_to_disk folder")
    if splits is not None:
        path.mkdir(parents=True)
        (path / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
        for name, data in splits.items():
            _arrow_save_to_disk(path / name, data, features, None)
        return
    path.mkdir(parents=True)
    arrays = {}
    for name, values in columns.items():
        kind = features[name]["_type"]
        if kind == "Image":
            cells = []
            for image in values:
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                cells.append({"bytes": buffer.getvalue(), "path": None})
            arrays[name] = pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        else:
            arrays[name] = pa.array(values, pa.int64() if kind == "ClassLabel" else pa.string())
    table = pa.table(arrays)
    with pa.ipc.new_stream(str(path / "data-00000-of-00001.arrow"), table.schema) as writer:
        writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": path.name,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    (path / "dataset_info.json").write_text(json.dumps({"features": features}))


def _load(source: Path | str, columns: Columns | None = None) -> Any:
    listing = read_source(str(source), "image", columns)
    data, _ = load_listing(listing, str(source), channels=3, resolution=R)
    return data


def test_save_to_disk_folder_images_captions_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "hf"
    _save_to_disk(folder, {"image": [_image(v) for v in (10, 100, 200)], "text": ["a cat", "a dog", "a car"]},
                  IMAGE_TEXT)
    data = _load(folder)
    assert data.ids == ["row-0", "row-1", "row-2"]
    assert data.captions == ["a cat", "a dog", "a car"]
    assert [_value(p) for p in data.pixels] == [10, 100, 200]
    # the same folder read by pyarrow alone (no datasets import) gives the same records
    pytest.importorskip("pyarrow")
    monkeypatch.setattr(hf_sources, "_import_datasets", lambda: None)
    again = _load(folder)
    assert again.ids == data.ids and again.captions == data.captions
    assert [_value(p) for p in again.pixels] == [10, 100, 200]


def test_save_to_disk_columns_id_column_and_splits(tmp_path: Path) -> None:
    string = {"dtype": "string", "_type": "Value"}
    feats = {"id": string, "picture": {"_type": "Image"}, "prompt": string, "text": string}
    rows = {"id": ["p-7", "p-9"], "picture": [_image(30), _image(60)], "prompt": ["first", "second"],
            "text": ["t1", "t2"]}
    folder = tmp_path / "custom"
    _save_to_disk(folder, rows, feats)
    data = _load(folder, Columns(image="picture", caption="prompt"))
    assert data.ids == ["p-7", "p-9"] and data.captions == ["first", "second"]
    assert _load(folder).captions == ["t1", "t2"]  # default caption column: text; the Image feature found
    both = tmp_path / "dict"
    _save_to_disk(both, {}, feats, splits={"train": rows, "test": {k: v[:1] for k, v in rows.items()}})
    data = _load(both)
    assert sorted(data.ids) == ["test/p-7", "train/p-7", "train/p-9"]


def test_bad_column_lists_the_columns_that_exist(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    _save_to_disk(folder, {"image": [_image(5)], "text": ["x"]}, IMAGE_TEXT)
    with pytest.raises(UserError, match=r"no column 'caption_en' \(--caption-column\); its columns are "
                                        r"'image', 'text'"):
        read_source(str(folder), "image", Columns(caption="caption_en"))
    with pytest.raises(UserError, match=r"no column 'img' \(--image-column\).*'image', 'text'"):
        read_source(str(folder), "image", Columns(image="img"))
    meta = tmp_path / "meta"
    meta.mkdir()
    _image(9).save(meta / "a.png")
    (meta / "metadata.csv").write_text("file_name,caption\na.png,hello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"no column 'text_de'.*'caption', 'file_name'"):
        read_source(str(meta), "image", Columns(caption="text_de"))
    texts = tmp_path / "t.csv"
    texts.write_text("review,stars\ngood,5\nbad,1\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"'review', 'stars'"):
        load_text_dataset(str(texts))
    assert load_text_dataset(str(texts), columns=Columns(text="review", label="stars")).classes == ["1", "5"]


def test_text_save_to_disk_with_class_labels(tmp_path: Path) -> None:
    folder = tmp_path / "reviews"
    _save_to_disk(folder, {"sentence": ["loved it", "hated it", "fine"], "label": [1, 0, 1]},
                  {"sentence": {"dtype": "string", "_type": "Value"},
                   "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}})
    data = load_text_dataset(str(folder))
    assert data.texts == ["loved it", "hated it", "fine"] and data.classes == ["neg", "pos"]
    assert [data.classes[k] for k in data.labels] == ["pos", "neg", "pos"]
    assert data.ids == ["row-0", "row-1", "row-2"]
    with pytest.raises(UserError, match=r"no column 'body' \(--text-column\); its columns are 'sentence', 'label'"):
        load_text_dataset(str(folder), columns=Columns(text="body"))


def test_imagefolder_metadata_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "jsonl"
    (jsonl / "train").mkdir(parents=True)
    _image(20).save(jsonl / "train" / "a.png")
    _image(40).save(jsonl / "train" / "b.png")
    (jsonl / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "ta", "caption": "ca"}) + "\n"
        + json.dumps({"file_name": "./b.png", "text": "tb", "caption": "cb"}) + "\n", encoding="utf-8")
    data = _load(jsonl)
    assert dict(zip(data.ids, data.captions, strict=True)) == {"train/a.png": "ta", "train/b.png": "tb"}
    assert _load(jsonl, Columns(caption="caption")).captions == ["ca", "cb"]
    folder = tmp_path / "csv"
    folder.mkdir()
    for name, value in (("x.png", 60), ("y.jpg", 90)):
        _image(value).save(folder / name)
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerows([["file_name", "prompt"], ["x.png", "a photo, with a comma"], ["y.jpg", "ünïcödé"]])
    data, report = load_folder(folder, channels=3, resolution=R)
    assert dict(zip(data.ids, data.captions, strict=True)) == {"x.png": "a photo, with a comma", "y.jpg": "ünïcödé"}
    assert not report.skipped and not report.uncaptioned  # metadata.csv is not reported as a skipped file


def test_kohya_sidecars_and_repeat_folder(tmp_path: Path) -> None:
    folder = tmp_path / "kohya"
    person = folder / "3_person"
    person.mkdir(parents=True)
    _image(50).save(person / "p1.png")
    (person / "p1.caption").write_text("ohwx person smiling\n", encoding="utf-8")
    (person / "p1.txt").write_text("ignored: .caption wins", encoding="utf-8")
    _image(70).save(person / "p2.png")
    (person / "p2.txt").write_text("ohwx person outdoors", encoding="utf-8")
    _image(150).save(folder / "plain.png")
    (folder / "plain.caption").write_text("a landscape", encoding="utf-8")
    data, report = load_folder(folder, channels=3, resolution=R)
    assert data.ids == ["3_person/p1.png", "3_person/p2.png", "plain.png"]
    assert data.captions == ["ohwx person smiling", "ohwx person outdoors", "a landscape"]
    assert data.repeats == [3, 3, 1] and not report.skipped  # .caption files are not "skipped" files
    expanded = data.expanded()
    assert expanded.ids == ["3_person/p1.png", "3_person/p1.png#2", "3_person/p1.png#3", "3_person/p2.png",
                            "3_person/p2.png#2", "3_person/p2.png#3", "plain.png"]
    assert [_value(p) for p in expanded.pixels] == [50, 50, 50, 70, 70, 70, 150]
    # the split picks source images; repeating the members afterwards never puts a copy on the other side
    splits = make_splits(data, members=0.34, aux=0.33, eval=0.33, seed=1, source=str(folder))
    members = data.by_ids(splits.members).expanded()
    bases = {i.split("#")[0] for i in members.ids}
    assert bases == set(splits.members) and not bases & (set(splits.aux) | set(splits.eval))
    assert len(members) == sum(3 if "3_person" in i else 1 for i in splits.members)


def test_zero_repeat_folder_and_missing_name_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "k" / "0_x").mkdir(parents=True)
    _image(1).save(tmp_path / "k" / "0_x" / "a.png")
    with pytest.raises(UserError, match="0 repeats"):
        read_source(str(tmp_path / "k"), "image")
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match="does not exist as a file or folder, and no dataset of that name is in "
                                        "the local Hugging Face cache"):
        read_source("nobody-privlora/no-such-dataset", "image")


def test_dataset_by_name_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``load_dataset("owner/name")`` leaves in the datasets cache after one online load
    (``owner___name/<config>/<version>/<hash>/``), read back by name with the network off."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    pq.write_table(pa.table({"text": ["good", "bad", "fine", "awful"], "label": ["pos", "neg", "pos", "neg"]}),
                   tmp_path / "train.parquet")
    builder = Parquet(data_files={"train": [str(tmp_path / "train.parquet")]}, dataset_name="tiny",
                      cache_dir=str(tmp_path / "built"))
    builder.download_and_prepare()
    cached = tmp_path / "cache" / "privlora-test___tiny" / "default" / "0.0.0" / "0123abcd"
    cached.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        if f.suffix in (".json", ".arrow"):
            f.rename(cached / f.name)
    data = load_text_dataset("privlora-test/tiny")
    assert data.texts == ["good", "bad", "fine", "awful"] and data.classes == ["neg", "pos"]
    assert data.ids == ["train/row-0", "train/row-1", "train/row-2", "train/row-3"]
    with pytest.raises(UserError, match="no dataset of that name is in the local Hugging Face cache"):
        load_text_dataset("privlora-test/other")


def test_train_two_steps_on_a_save_to_disk_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)) for _ in range(12)]
    _save_to_disk(folder, {"image": images, "text": [f"photo {i}" for i in range(12)]}, IMAGE_TEXT)
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(folder), "--max-steps", "2", "--batch-size", "2", "--out", str(out),
                   *FAST)
    assert proc.returncode == 0, proc.stderr
    splits = json.loads((out / "splits.json").read_text())
    everything = splits["members"] + splits["aux_nonmembers"] + splits["eval_nonmembers"]
    assert set(everything) <= {f"row-{i}" for i in range(12)} and len(set(everything)) == len(everything)
    assert splits["members"]


def test_dp_refuses_kohya_repeats(tmp_path: Path) -> None:
    folder = tmp_path / "kohya" / "10_me"
    folder.mkdir(parents=True)
    for i in range(8):
        _image(i * 20).save(folder / f"{i}.png")
    out = tmp_path / "run"
    proc = run_cli("train", "--mode", "dp", "--noise-multiplier", "1", "--data", str(folder.parent),
                   "--max-steps", "1", "--out", str(out), *FAST)
    assert_one_line_error(proc, "repeat folders", "10_me", "dp")
    assert not out.exists()


def test_repeats_multiply_the_members_after_the_split(tmp_path: Path) -> None:
    """plain mode: a ``3_me`` folder triples what an epoch sees; splits.json names each source image once."""
    folder = tmp_path / "kohya" / "3_me"
    folder.mkdir(parents=True)
    for i in range(8):
        _image(i * 30).save(folder / f"{i}.png")
    out = tmp_path / "run"
    proc = run_cli("train", "--data", str(folder.parent), "--num-train-epochs", "1", "--batch-size", "4",
                   "--set", "data.members=0.5", "--set", "data.aux=0.25", "--set", "data.eval=0.25",
                   "--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["members"]) == 4 and all("#" not in i for i in splits["members"])
    steps = yaml.safe_load((out / "config.yaml").read_text())["optim"]["max_steps"]
    assert steps == 3  # ceil(4 members × 3 repeats / batch 4); without the repeats it would be 1


def test_text_train_with_named_columns(tmp_path: Path) -> None:
    """--text-column / --label-column reach the text task's loader (and config.yaml)."""
    reviews = tmp_path / "reviews.csv"
    rows = [["review", "stars"], *([f"great item {i}", "5"] if i % 2 else [f"awful item {i}", "1"] for i in range(24))]
    with reviews.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "run"
    proc = run_cli("train", "--task", "text", "--data", str(reviews), "--text-column", "review", "--label-column",
                   "stars", "--max-steps", "2", "--batch-size", "4", "--out", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert (data["text_column"], data["label_column"]) == ("review", "stars")
    bad = run_cli("train", "--task", "text", "--data", str(reviews), "--out", str(tmp_path / "r2"), "-q")
    assert_one_line_error(bad, "'review', 'stars'")
