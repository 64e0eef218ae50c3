"""unetseg.dataset: classes.json and dataset.json survive a JSON round trip, and bad files fail naming the file, the value and the fix."""

from __future__ import annotations

import json

import pytest

from unetseg.dataset import MAX_LABEL, ClassInfo, DatasetInfo, SplitInfo
from unetseg.errors import UnetsegError


def make_info() -> DatasetInfo:
    classes = ClassInfo.from_dict({"names": ["sky", "road", "car"], "palette": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
                                   "ignore_index": 200})
    splits = {"train": SplitInfo(5, ["train-000000.tar", "train-000001.tar"], [4, 1], [10, 20, 30], 7, {"24x32": 5}, 999),
              "val": SplitInfo(2, ["val-000000.tar"], [2], [1, 2, 3], 0, {"24x32": 1, "48x64": 1})}
    return DatasetInfo(classes=classes, splits=splits, created_by={"command": "pack"},
                       skipped=[{"path": "x.png", "what": "w", "fix": "f"}], unetseg_version="1.2.3")


def assert_names_file_and_fix(error: pytest.ExceptionInfo, path, *fragments: str) -> None:
    message = str(error.value)
    for text in (str(path), "Fix:", *fragments):
        assert text in message, f"{text!r} not in {message!r}"


def test_dataset_json_round_trip(tmp_path):
    info = make_info()
    (tmp_path / "dataset.json").write_text(info.to_json())
    for where in (tmp_path, tmp_path / "dataset.json"):  # the folder, or the file itself
        loaded = DatasetInfo.load(where)
        assert loaded == info
        assert loaded.num_classes == 3 and loaded.split("val").image_sizes == {"24x32": 1, "48x64": 1}
    # Lists of numbers stay on one line (palettes, counts); the text is still plain JSON.
    text = info.to_json()
    assert '"pixel_counts": [10, 20, 30]' in text and "[1, 2, 3]" in text
    assert json.loads(text) == info.to_dict()


def test_classes_round_trip_and_ignore_label():
    with_ignore = ClassInfo.from_dict({"names": ["a", "b"], "ignore_index": 2})
    assert ClassInfo.from_dict(json.loads(json.dumps(with_ignore.to_dict()))) == with_ignore
    assert with_ignore.ignore_label == 2 and with_ignore.num_classes == 2
    # Without ignore_index, padding still needs a label no class uses.
    without = ClassInfo.from_dict({"names": ["a", "b"]})
    assert without.ignore_index is None and without.ignore_label == MAX_LABEL == 255


def test_ignore_index_limits():
    assert ClassInfo.from_dict({"names": ["a", "b"], "ignore_index": 2}).ignore_index == 2  # first free id
    for bad in (256, -1, True, "255", 2.0):
        with pytest.raises(UnetsegError, match=r'"ignore_index" must be an integer 0\.\.255.*Fix:'):
            ClassInfo.from_dict({"names": ["a", "b"], "ignore_index": bad})
    ClassInfo.from_dict({"names": [f"c{i}" for i in range(MAX_LABEL)]})  # 255 classes fit, with distinct default colours
    with pytest.raises(UnetsegError, match="256 classes, more than the 255"):
        ClassInfo.from_dict({"names": [f"c{i}" for i in range(MAX_LABEL + 1)]})


def test_palette_colours_must_differ():
    with pytest.raises(UnetsegError, match="share a colour.*Fix:"):
        ClassInfo.from_dict({"names": ["a", "b"], "palette": [[1, 1, 1], [1, 1, 1]]})


def test_missing_and_unparsable_classes_json(tmp_path):
    with pytest.raises(UnetsegError) as e:
        ClassInfo.load(tmp_path / "nope.json")
    assert_names_file_and_fix(e, tmp_path / "nope.json", "no such file", "--classes")
    (tmp_path / "bad.json").write_text('{"names": ["a",]}')
    with pytest.raises(UnetsegError) as e:
        ClassInfo.load(tmp_path / "bad.json")
    assert_names_file_and_fix(e, tmp_path / "bad.json", "not valid JSON")


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"format": "something-else"}, ["not an unetseg dataset.json", "re-run `unetseg pack`"]),
        ({"format_version": 99}, ["format version 99 is newer", "upgrade unetseg"]),
        ({"splits": {"train": {"num_samples": 1}}}, ["malformed splits", "re-run `unetseg pack`"]),
        ({"format_version": "1"}, ["format_version '1' is not a whole number", "re-run `unetseg pack`"]),
        ({"splits": ["train", "val"]}, ["malformed splits", "re-run `unetseg pack`"]),
        ({"splits": {"train": {**make_info().to_dict()["splits"]["train"], "shards": "train-000000.tar"}}},
         ["split 'train' needs a list of shard names", "re-run `unetseg pack`"]),
        ({"classes": {"names": ["a", "a"]}}, ["(classes)", "class names repeat"]),
    ],
)
def test_bad_dataset_json_names_the_file_and_fix(tmp_path, change, fragments):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({**make_info().to_dict(), **change}))
    with pytest.raises(UnetsegError) as e:
        DatasetInfo.load(tmp_path)
    assert_names_file_and_fix(e, path, *fragments)


def test_missing_dataset_json_and_unknown_split(tmp_path):
    with pytest.raises(UnetsegError) as e:
        DatasetInfo.load(tmp_path)
    assert_names_file_and_fix(e, tmp_path / "dataset.json", "no such file", "unetseg pack")
    with pytest.raises(UnetsegError, match=r"no split 'test'; it has \['train', 'val'\]\. Fix: pick one"):
        make_info().split("test")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"names": ["a", "b"], "palette": [[0, 0, 0]]}, "1 colours for 2 names"),
        ({"names": ["a", "b"], "ignore_index": 1}, "also the id of class 'b'"),
        ({"names": ["a", "a"]}, "class names repeat"),
        ({"names": []}, "non-empty list"),
        ({"names": ["a"], "palette": [[0, 0, 300]]}, "integers 0..255"),
        ({"names": ["a"], "palette": [[True, 0, 0]]}, "integers 0..255"),
        ({"names": ["a"], "colors": []}, "unknown keys"),
    ],
)
def test_bad_classes_json_names_the_file_and_fix(tmp_path, data, message):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UnetsegError) as e:
        ClassInfo.load(path)
    assert message in str(e.value) and str(path) in str(e.value) and "Fix:" in str(e.value)


def test_palette_is_optional():
    info = ClassInfo.from_dict({"names": ["a", "b", "c"]})
    assert len(info.palette) == 3 and len({tuple(c) for c in info.palette}) == 3 and info.ignore_index is None
