"""The CPU batch sizes remembered between runs (:class:`~TextSegLib.engine.batching.BatchSizeCache`): a damaged
file, two real processes writing at once, and one entry per model, thread count and slice size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from testkit import REPO

from TextSegLib.core.results import CancelToken
from TextSegLib.engine.batching import BatchSizeCache, BatchTuner
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.io.volumes import Volume

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


def test_the_cache_lives_in_the_user_s_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert BatchSizeCache().path == tmp_path / "textseg" / "cpu-batch-sizes.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert BatchSizeCache().path == tmp_path / "home" / ".cache" / "textseg" / "cpu-batch-sizes.json"


@pytest.mark.parametrize("damage", [b"{\"a\": 4", b"\x00\xff\x00", b"[4, 8]", b"{\"a\": \"4\", \"b\": 3, \"c\": true}",
                                    b""])
def test_a_damaged_file_is_ignored_and_replaced_at_the_next_choice(tmp_path, damage):
    cache = BatchSizeCache(tmp_path / "textseg" / "cpu-batch-sizes.json")
    cache.path.parent.mkdir()
    cache.path.write_bytes(damage)
    assert cache.get("a") is None and cache.get("b") is None and cache.get("c") is None
    cache.put("a", 8)
    assert json.loads(cache.path.read_text(encoding="utf-8")) == {"a": 8}
    assert cache.get("a") == 8
    assert [p.name for p in cache.path.parent.iterdir() if not p.name.endswith(".lock")] == [cache.path.name]


def test_a_folder_that_cannot_be_written_fails_no_run(tmp_path):
    blocker = tmp_path / "textseg"
    blocker.write_text("a file where the folder should be")
    cache = BatchSizeCache(blocker / "cpu-batch-sizes.json")
    cache.put("a", 2)  # only logged
    assert cache.get("a") is None


def test_two_processes_writing_at_once_keep_every_entry_and_a_whole_file(tmp_path):
    """Each writer re-reads the file under the lock and replaces it atomically: no entry is lost to the other
    writer, and no reader ever sees half a file."""
    path = tmp_path / "textseg" / "cpu-batch-sizes.json"
    code = ("import sys\nfrom TextSegLib.engine.batching import BatchSizeCache\n"
            "cache = BatchSizeCache(sys.argv[1])\n"
            "for n in range(60):\n"
            "    cache.put(f'{sys.argv[2]}-{n}', 4)\n"
            "    assert cache.get(f'{sys.argv[2]}-{n}') == 4\n")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), name], cwd=REPO, stderr=subprocess.PIPE)
               for name in ("first", "second")]
    for writer in writers:
        _, error = writer.communicate(timeout=120)
        assert writer.returncode == 0, error.decode()
    entries = json.loads(path.read_text(encoding="utf-8"))
    assert sorted(entries) == sorted(f"{name}-{n}" for name in ("first", "second") for n in range(60))
    assert set(entries.values()) == {4}


def test_the_oldest_entries_go_beyond_the_limit(tmp_path):
    cache = BatchSizeCache(tmp_path / "sizes.json")
    for n in range(BatchSizeCache.MAX_ENTRIES + 3):
        cache.put(f"k{n}", 1)
    entries = json.loads(cache.path.read_text(encoding="utf-8"))
    assert len(entries) == BatchSizeCache.MAX_ENTRIES and "k0" not in entries and "k2" not in entries
    assert f"k{BatchSizeCache.MAX_ENTRIES + 2}" in entries


def test_a_fresh_process_takes_the_size_chosen_before_for_the_same_model_threads_and_slices(lung2, small_checkpoint):
    """The first run times its batch size and remembers it; a model loaded afresh (as in a new process) computes at
    that size from its first slice. Another slice size or thread count is timed again (from one slice per batch),
    under its own key. (That a batch size changes no probability is test_inference's.)"""
    volume = Volume.from_sitk(lung2.to_sitk()[128:384, 128:384, 14:46])
    cropped = Volume.from_sitk(lung2.to_sitk()[128:328, 128:328, 14:46])
    model = load_model(small_checkpoint, "cpu")
    model.cpu_batch.clear()
    sizes: list[int] = []
    original = InferenceEngine._probabilities

    def recording(self, loaded, slices, *args):
        sizes.append(slices.shape[0])
        return original(self, loaded, slices, *args)

    def first_batches(volume: Volume) -> list[int]:
        """The batch sizes of a run stopped after its second batch."""
        model.cpu_batch.clear()
        sizes.clear()
        cancel = CancelToken()
        stop = iter([False, True])
        InferenceEngine(model, amp=False).segment(volume, PROMPT, cancel=cancel,
                                                  progress=lambda *_: next(stop) and cancel.cancel())
        return list(sizes)

    cache = BatchSizeCache()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InferenceEngine, "_probabilities", recording)
        InferenceEngine(model, amp=False).segment(volume, PROMPT)
        chosen = InferenceEngine(model, amp=False).chosen_batch_size(model)
        assert chosen in BatchTuner.CANDIDATES
        entries = json.loads(cache.path.read_text(encoding="utf-8"))
        assert entries == {f"{model.id} weights={model.info.weights_sha256[:16]} cpu None compile=False "
                           f"threads={torch.get_num_threads()} slice=256x256": chosen}

        assert first_batches(volume) == [chosen, chosen]  # the same model in a new process
        assert first_batches(cropped) == [1, 1]  # other slices
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            assert first_batches(volume) == [1, 1]  # another thread count
        finally:
            torch.set_num_threads(threads)
        assert first_batches(volume) == [chosen, chosen]  # the first key still holds
    assert json.loads(cache.path.read_text(encoding="utf-8")) == entries
    model.cpu_batch.clear()
