"""keras_reformer.data against the files' bytes as Python reads them."""

import doctest
import os
import sysconfig

import numpy as np
import pytest

from keras_reformer import data
from keras_reformer.data import corpus, text_windows


@pytest.fixture
def text_files(tmp_path):
    """Three files of known bytes (ASCII, UTF-8 multi-byte, binary-ish)."""
    contents = [b"hello world\n" * 5, "h\u00e9llo \u2603 w\u00f6rld\n".encode() * 4,
                bytes(range(256))]
    paths = []
    for i, content in enumerate(contents):
        path = tmp_path / f"f{i}.txt"
        path.write_bytes(content)
        paths.append(str(path))
    return paths, b"".join(contents)


def windows_of(stream, size):
    """Non-overlapping windows of `size` bytes, the partial last one dropped."""
    ids = np.frombuffer(stream, dtype=np.uint8).astype(np.int32)
    count = len(ids) // size
    return ids[: count * size].reshape(count, size)


# --------------------------------------------------------- default corpus


def test_default_corpus_files_exist_and_are_sorted_stdlib_sources():
    files = data.default_corpus_files()
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    assert len(files) > 50
    assert files == sorted(files)
    assert len(set(files)) == len(files)
    for path in files:
        assert path.endswith(".py") and os.path.isfile(path)
        assert os.path.dirname(os.path.realpath(path)) == stdlib
        assert os.path.getsize(path) > 0
    assert data.default_corpus_files() == files


def test_default_corpus_max_bytes_stops_after_reaching_it():
    everything = data.default_corpus_files()
    files = data.default_corpus_files(max_bytes=200_000)
    assert files == everything[: len(files)]
    sizes = [os.path.getsize(f) for f in files]
    assert sum(sizes) >= 200_000 > sum(sizes[:-1])


def test_default_corpus_bad_max_bytes():
    with pytest.raises(ValueError, match="Received: max_bytes=0"):
        data.default_corpus_files(max_bytes=0)


# ------------------------------------------------------------------ split


@pytest.mark.parametrize("count,every", [(2, 10), (9, 10), (10, 10), (25, 10), (7, 3)])
def test_split_is_deterministic_disjoint_and_complete(count, every):
    files = [f"file{i:02d}" for i in range(count)]
    train, validation = data.split_files(files, validation_every=every)
    assert (train, validation) == data.split_files(list(files), validation_every=every)
    assert train and validation
    assert not set(train) & set(validation)
    assert sorted(train + validation) == files
    assert train == sorted(train) and validation == sorted(validation)
    want = [f for i, f in enumerate(files) if (i + 1) % every == 0] or files[-1:]
    assert validation == want


def test_split_keeps_a_path_listed_twice_in_training():
    train, validation = data.split_files(["a", "b", "a", "c"], validation_every=2)
    assert (train, validation) == (["a", "a"], ["b", "c"])


@pytest.mark.parametrize(
    "files,every,match",
    [
        (["only"], 10, "at least 2"),
        ("ab", 10, "Received: files='ab'"),
        (["a", "b"], 1, "Received: validation_every=1"),
        (["a", "b"], 0, "Received: validation_every=0"),
    ],
)
def test_split_bad_arguments(files, every, match):
    with pytest.raises(ValueError, match=match):
        data.split_files(files, validation_every=every)


# ---------------------------------------------------------------- windows


def test_byte_windows_cover_the_bytes_in_order(text_files):
    paths, stream = text_files
    got = np.stack([w.numpy() for w in data.byte_windows(paths, 7)])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, windows_of(stream, 7))


def test_lm_dataset_shapes_and_next_byte_targets(text_files):
    paths, stream = text_files
    seq_len, batch = 5, 3
    ds = data.lm_dataset(paths, seq_len, batch, shuffle=False, repeat=False)
    windows = windows_of(stream, seq_len + 1)
    batches = list(ds)
    assert len(batches) == len(windows) // batch
    for k, (inputs, targets) in enumerate(batches):
        assert inputs["token_ids"].shape == (batch, seq_len)
        assert inputs["token_ids"].dtype == "int32" and targets.dtype == "int32"
        want = windows[k * batch : (k + 1) * batch]
        np.testing.assert_array_equal(inputs["token_ids"], want[:, :-1])
        np.testing.assert_array_equal(targets, want[:, 1:])
        np.testing.assert_array_equal(inputs["padding_mask"], np.ones((batch, seq_len)))


def test_lm_dataset_shuffle_permutes_windows_reproducibly(text_files):
    paths, stream = text_files
    def rows(seed):
        ds = data.lm_dataset(paths, 4, 1, seed=seed, repeat=False,
                             with_padding_mask=False)
        return np.concatenate([np.concatenate([x, y[:, -1:]], 1) for x, y in ds])

    windows = windows_of(stream, 5)
    shuffled = rows(3)
    assert not np.array_equal(shuffled, windows)
    assert sorted(map(tuple, shuffled)) == sorted(map(tuple, windows))
    np.testing.assert_array_equal(rows(3), shuffled)


def test_lm_dataset_repeats(text_files):
    paths, _ = text_files
    ds = data.lm_dataset(paths, 8, 4, shuffle=False, with_padding_mask=False)
    once = list(data.lm_dataset(paths, 8, 4, shuffle=False, repeat=False,
                                with_padding_mask=False))
    again = list(ds.take(2 * len(once)))
    np.testing.assert_array_equal(again[len(once)][0], once[0][0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq_len": 0}, "Received: seq_len=0"),
        ({"batch_size": 2.0}, "Received: batch_size=2.0"),
        ({"seed": -1}, "Received: seed=-1"),
        ({"shuffle": "yes"}, "Received: shuffle='yes'"),
        ({"files": "one_path.txt"}, "must be a list of file paths"),
        ({"files": []}, "at least one path"),
    ],
)
def test_lm_dataset_bad_arguments(text_files, kwargs, match):
    args = dict(files=text_files[0], seq_len=4, batch_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        data.lm_dataset(**args)


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.byte_windows([str(tmp_path / "nope.txt")], 4)


@pytest.mark.parametrize("module", [data, corpus, text_windows])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
