"""alignlab._atomic and the writers that use it: names that fit, and fsync before and after every rename.

A rename is atomic while the system runs, but after a power cut the new name can point at an empty or
truncated file unless its data was flushed first. The journal below records every fsync (with the path
behind the descriptor) and every rename: each file moved into place must have been fsynced before its
rename, and its folder after it.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_llama

from alignlab._atomic import fsync_dir, fsync_file, keep_mode, made_folder, sibling, write_atomically


class Journal:
    """``events``: ``("fsync", path)`` and ``("rename", src, dst)`` in the order they happened."""

    def __init__(self, monkeypatch):
        self.events = []
        fsync, replace, rename = os.fsync, os.replace, os.rename

        def fsync_(fd):
            self.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
            return fsync(fd)

        def move(real):
            def move_(src, dst, **kw):
                self.events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
                return real(src, dst, **kw)

            return move_

        monkeypatch.setattr(os, "fsync", fsync_)
        monkeypatch.setattr(os, "replace", move(replace))
        monkeypatch.setattr(os, "rename", move(rename))

    def synced(self, path, before: int | None = None, after: int = 0) -> bool:
        end = len(self.events) if before is None else before
        return ("fsync", os.path.realpath(path)) in self.events[after:end]

    def check_installed(self, target: Path) -> None:
        """The last rename onto ``target``: its source (each file in it, for a folder) fsynced before, the folder
        holding ``target`` fsynced after."""
        target = os.path.realpath(target)
        i = max(k for k, e in enumerate(self.events) if e[0] == "rename" and e[2] == target)
        src = Path(self.events[i][1])
        files = [src] if not Path(target).is_dir() else [src / p.name for p in Path(target).iterdir()]
        for f in files:
            assert self.synced(f, before=i), f"{f.name} renamed into place without an fsync"
        if Path(target).is_dir():
            assert self.synced(src, before=i), "the new folder's entries were not fsynced"
        assert self.synced(Path(target).parent, after=i), f"{Path(target).parent} not fsynced after the rename"


def test_sibling_names_fit_255_bytes():
    assert sibling(Path("/x/out"), "partial-1234") == Path("/x/.out.partial-1234")
    for name in ("n" * 255, "模" * 85, "a" + "模" * 84):
        got = sibling(Path("/x") / name, "old-12345678")
        assert len(got.name.encode()) <= 255 and got.name.endswith(".old-12345678") and got.parent == Path("/x")
        assert name.startswith(got.name[1:-len(".old-12345678")])  # cut on whole characters


def test_fsync_helpers(tmp_path):
    (tmp_path / "f").write_text("x")
    fsync_file(tmp_path / "f")
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # no folder: nothing to flush
    with pytest.raises(FileNotFoundError):
        fsync_file(tmp_path / "missing")


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_a_replaced_file_keeps_its_permissions_a_new_one_gets_the_umasks(tmp_path, mode):
    """A rename does not carry the old file's mode over: a private 0600 file came back 0644 (the umask's)."""
    old = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "r.txt"
        write_atomically(target, lambda tmp: Path(tmp).write_text("1"))
        assert target.stat().st_mode & 0o777 == 0o644  # new: the umask decides, as for open()
        os.chmod(target, mode)
        write_atomically(target, lambda tmp: Path(tmp).write_text("2"))
    finally:
        os.umask(old)
    assert target.read_text() == "2" and target.stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.txt"]
    keep_mode(target, tmp_path / "missing")  # nothing to copy from: left as it is
    assert target.stat().st_mode & 0o777 == mode


def test_a_failed_atomic_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]


def test_a_failed_write_removes_the_folders_it_made_and_only_those(tmp_path):
    """Parent folders created for a write that then failed were left behind, empty."""
    def fail(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "a" / "b" / "r.json", fail)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with made_folder(tmp_path / "a" / "b" / "c"):
            (tmp_path / "a" / "b" / "other").write_text("someone else's")
            raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["other"]  # not empty: kept, and above it
    with made_folder(tmp_path / "x" / "y") as folder:
        (folder / "f").write_text("1")
    assert (tmp_path / "x" / "y" / "f").read_text() == "1"


def test_a_symlinked_target_is_written_through(tmp_path):
    """A results file that is a link (to a shared folder, say) was replaced by a plain file: the link was lost and
    the file it pointed to kept the old contents."""
    (tmp_path / "shared").mkdir()
    real = tmp_path / "shared" / "r.json"
    real.write_text("old")
    os.symlink(real, tmp_path / "r.json")
    assert write_atomically(tmp_path / "r.json", lambda tmp: Path(tmp).write_text("new")) == tmp_path / "r.json"
    assert (tmp_path / "r.json").is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["r.json"]
    os.symlink(tmp_path / "shared" / "new.json", tmp_path / "dangling.json")  # a link to a file not made yet
    write_atomically(tmp_path / "dangling.json", lambda tmp: Path(tmp).write_text("1"))
    assert (tmp_path / "dangling.json").is_symlink() and (tmp_path / "shared" / "new.json").read_text() == "1"


def test_a_folder_as_target_is_named(tmp_path):
    """``save_json(folder)`` failed in the rename with IsADirectoryError naming the temporary file."""
    from alignlab.bench import write_json

    (tmp_path / "results").mkdir()
    with pytest.raises(ValueError, match=r"path '.*results' is a folder; a file was to be written there"):
        write_json(tmp_path / "results", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["results"] and not list((tmp_path / "results").iterdir())


def test_save_adapter_fsyncs_its_files_and_folder(tmp_path, monkeypatch):
    from alignlab.adapters import LoRAConfig, inject, save_adapter

    model = inject(make_tiny_llama(), LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    journal = Journal(monkeypatch)
    save_adapter(model, tmp_path)  # over the previous files, as a training loop saves every N steps
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        journal.check_installed(tmp_path / name)


def test_bench_results_are_fsynced(tmp_path, monkeypatch):
    from alignlab.bench import compare, save_results

    cmp = compare({"a": lambda: None}, device="cpu", rep=2, warmup=0, memory=False)
    journal = Journal(monkeypatch)
    journal.check_installed(cmp.save_json(tmp_path / "r.json"))
    journal.check_installed(save_results(tmp_path / "all.json", [cmp]))
    pytest.importorskip("matplotlib")
    journal.check_installed(cmp.plot(tmp_path / "p.png"))  # savefig did not fsync at all


def test_merged_checkpoints_are_fsynced(tmp_path, monkeypatch):
    from alignlab.merging.checkpoint import merge_checkpoints

    for seed, name in enumerate(("base", "a")):
        (tmp_path / name).mkdir()
        g = torch.Generator().manual_seed(seed)
        save_file({f"w{i}": torch.randn(8, 8, generator=g) for i in range(3)}, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text('{"torch_dtype": "float32"}')
        (tmp_path / name / "tokenizer.json").write_text("{}")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "bfloat16",
              "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 0.5}}], "out_shard_size": 300}
    journal = Journal(monkeypatch)
    out = merge_checkpoints(recipe, tmp_path / "out")  # shards, index, config, tokenizer
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".safetensors")) == [
        "config.json", "model.safetensors.index.json", "tokenizer.json"]
    journal.check_installed(out)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 3
    merge_checkpoints(recipe, out, overwrite=True)  # replacing a previous merge
    journal.check_installed(out)


def test_a_mkdir_failing_part_way_removes_the_folders_it_made(tmp_path):
    """``mkdir(parents=True)`` made ``new/`` and then failed on a name too long below it: that was before
    ``made_folder``'s cleanup applied, so the failed write left ``new/`` behind, empty."""
    too_long = tmp_path / "new" / "deeper" / ("x" * 300) / "r.json"
    with pytest.raises(OSError, match="too long"):
        write_atomically(too_long, lambda tmp: Path(tmp).write_text("1"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="too long"):
        with made_folder(tmp_path / "a" / ("y" * 300)):
            pass
    assert list(tmp_path.iterdir()) == []
