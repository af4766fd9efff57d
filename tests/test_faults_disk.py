"""The fault matrix, part 3 (issue 22): faults by class, not by case.

* library write errors that are not OSError (safetensors' SafetensorError "File too large", torch.save's
  "unexpected pos") under a real file-size limit (RLIMIT_FSIZE, in a subprocess);
* library read errors (safetensors, torch.load, json, yaml, pyarrow, gzip, UTF-8) through ``errors.reading``
  and through the commands that read run files;
* the run-directory lock; leftovers of killed writers.

Same contract as test_faults.py: exit code 2, exactly one "error:" line and no traceback, what existed unchanged.
The fixtures ``setup`` (one finished tiny run) and ``run`` (a private copy) live in conftest.py.
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, fails, no_temporaries, overrides, tree_hash, truncate
from neuroada_cli.cli import main
from neuroada_cli.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_log_handler")

# ------------------------------------------------------------------------- writes under a file-size limit
def fails_under_limit(capsys, limit: int, args: list[str]) -> str:
    """``neuroada ARGS`` while no file may grow past ``limit`` bytes (RLIMIT_FSIZE's soft limit, restored after;
    Python ignores SIGXFSZ, so a write past it fails with EFBIG as on a real quota): exit 2, one error line."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        return fails(capsys, args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


EFBIG = "File too large (EFBIG); free space (or raise the file-size limit)"


# The run's small files (config.yaml 2 kB, train_log.jsonl) fit under each limit; the named file does not.
@pytest.mark.parametrize("limit, checkpoint_every, written, library", [
    (10_000, 0, "adapter", "safetensors (the final adapter)"),
    (30_000, 2, "checkpoints/step-2", "torch.save (trainer_state.pt)"),
])
def test_training_write_past_the_file_size_limit_is_one_line(setup, tmp_path, capsys, limit, checkpoint_every,
                                                           written, library):
    out = tmp_path / "out"
    line = fails_under_limit(capsys, limit, ["train", *overrides(setup, out, checkpoint_every=checkpoint_every)])
    assert f"cannot write {out / written}: {EFBIG}" in line, library
    assert not (out / written).exists() and not (out / "run.json").exists()
    no_temporaries(out)


def test_export_past_the_file_size_limit_is_one_line(run, tmp_path, capsys):
    before, target = tree_hash(run), tmp_path / "merged"
    line = fails_under_limit(capsys, 100_000, ["export", f"run={run}", f"output={target}"])  # model.safetensors: 179 kB
    assert f"cannot write {target}: {EFBIG}" in line
    assert not target.exists() and tree_hash(run) == before
    no_temporaries(tmp_path)


def _serializing_error():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


@pytest.mark.parametrize("raised, cause", [
    (lambda: OSError(errno.ENOSPC, "No space left on device"), "No space left on device (ENOSPC)"),
    (_serializing_error, "File too large (EFBIG)"),
    (lambda: RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                          "data/0: file write failed"), "RuntimeError: [enforce fail"),
])
def test_atomic_directory_maps_every_library_write_error(tmp_path, raised, cause):
    from neuroada_cli.atomic import WriteError, atomic_directory

    target = tmp_path / "target"
    with pytest.raises(WriteError) as caught, atomic_directory(target) as staging:
        (staging / "part").write_text("x")
        raise raised()
    assert str(caught.value).startswith(f"cannot write {target}: {cause}")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_directory_keeps_other_errors_as_they_are(tmp_path):
    from neuroada_cli.atomic import atomic_directory

    with pytest.raises(KeyError), atomic_directory(tmp_path / "target"):
        raise KeyError("a bug, not a disk fault: its traceback must show")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ reads: errors.reading
def _safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(64)}, str(path))
    truncate(path)


def _torch_file(path: Path) -> None:
    torch.save({"a": torch.zeros(64)}, path)
    truncate(path)


def _read_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _read_yaml(path):
    import yaml

    return yaml.safe_load(path.read_text())


def _read_gzip_json(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _cut_gzip(path: Path) -> None:
    data = gzip.compress(json.dumps(list(range(2000))).encode())
    path.write_bytes(data[: len(data) // 2])


# one row per library we read with: (file name, damage, read)
READERS = {
    "safetensors": ("w.safetensors", _safetensors, _read_safetensors),
    "torch.load": ("s.pt", _torch_file, lambda p: torch.load(p, weights_only=True)),
    "json": ("c.json", lambda p: p.write_text('{"k": [1, 2'), lambda p: json.loads(p.read_text())),
    "yaml": ("c.yaml", lambda p: p.write_text("a: [1, 2\nb: {"), _read_yaml),
    "pyarrow": ("t.parquet", lambda p: p.write_bytes(b"PAR1 not really"), _read_parquet),
    "utf-8": ("t.txt", lambda p: p.write_bytes(b"ok\n\xff\xfe bad"), lambda p: p.read_text(encoding="utf-8")),
    "gzip": ("t.json.gz", _cut_gzip, _read_gzip_json),
}


@pytest.mark.parametrize("library", list(READERS))
def test_reading_turns_every_library_error_into_one_line_naming_the_file(tmp_path, library):
    from neuroada_cli.errors import reading

    name, damage, read = READERS[library]
    path = tmp_path / name
    damage(path)
    with pytest.raises(UserError) as caught, reading(path, "test file", "write it again"):
        read(path)
    message = str(caught.value)
    assert message.startswith(f"test file {str(path)!r} is damaged (") and message.endswith("; write it again")
    assert "\n" not in message


def test_reading_names_a_missing_file_and_lets_user_errors_through(tmp_path):
    from neuroada_cli.errors import reading

    with pytest.raises(UserError, match="test file .* not found; fix"), reading(tmp_path / "absent", "test file", "fix"):
        (tmp_path / "absent").read_text()
    with pytest.raises(UserError, match="^already one line$"), reading(tmp_path, "x", "y"):
        raise UserError("already one line")


# ------------------------------------------------------------------------ reads: the commands' run files
def _torn_last_prediction(run: Path) -> Path:
    folder = run / "eval" / "predictions"
    folder.mkdir(parents=True)
    rows = [{"gold": 0, "extracted": 0}, {"gold": 1, "extracted": 0}]
    (folder / "rte.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"gold": 1, "extr')
    return folder / "rte.jsonl"


@pytest.mark.parametrize("damage, named", [
    (lambda run: truncate(run / "adapter" / "adapter_model.safetensors"),
     "adapter weights '{run}/adapter/adapter_model.safetensors' is damaged"),
    (lambda run: (run / "run.json").write_text('{"method": "neur'), "'{run}/run.json' is damaged (not valid JSON"),
    (lambda run: (run / "train_log.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\n'),
     "train log '{run}/train_log.jsonl' is damaged (not UTF-8 text"),
    (lambda run: _torn_last_prediction(run).write_text('{"gold": 1, "ex\n{"gold": 0, "extracted": 0}\n'),
     "predictions file '{run}/eval/predictions/rte.jsonl' is damaged (line 1 is not valid JSON"),
])
def test_inspect_of_a_damaged_run_names_the_file(run, tmp_path, capsys, damage, named):
    damage(run)
    before = tree_hash(run)
    line = fails(capsys, ["inspect", f"run={run}", f"output={tmp_path / 'report'}"])
    assert named.format(run=run) in line
    assert tree_hash(run) == before and not (tmp_path / "report").exists()


def test_inspect_skips_a_torn_last_prediction_line_with_a_note(run, tmp_path, capsys):
    import logging

    path = _torn_last_prediction(run)
    notes = logging.getLogger("neuroada_cli")
    for handler in list(notes.handlers):  # the fixture `setup` bound one to its own stdout: notes come here
        notes.removeHandler(handler)
    capsys.readouterr()
    assert main(["inspect", f"run={run}", f"output={tmp_path / 'report'}"]) == 0
    captured = capsys.readouterr()
    assert f"{path}: line 3 is cut short" in captured.out and "read the 2 lines before it" in captured.out
    assert (tmp_path / "report" / "confusion_rte.png").is_file() and captured.err == ""


@pytest.mark.parametrize("damage, named", [
    (lambda run: truncate(run / "checkpoints" / "step-4" / "trainer_state.pt"), "trainer state"),
    (lambda run: (run / "config.yaml").write_bytes(b"method: neuroada\n\xff\xfe: x\n"), "run config"),
])
def test_resume_from_damaged_run_files_names_them(setup, run, capsys, damage, named):
    damage(run)
    before = tree_hash(run)
    line = fails(capsys, ["train", *overrides(setup, run, steps=6), "trainer.resume=true"])
    assert named in line and "is damaged" in line
    assert tree_hash(run) == before


# ------------------------------------------------------------------------------------- data encodings
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


def _jsonl_with_latin1_row(path: Path) -> None:
    good = json.dumps(CHAT[0]).encode()
    path.write_bytes(good + b"\n\n" + good.replace(b"hello", b"h\xe9llo") + b"\n")  # row 2 sits on line 3


def _csv_latin1(path: Path) -> None:
    path.write_bytes(b"prompt,completion\nQ: a,b\nQ: caf\xe9,c\n")


def _json_latin1(path: Path) -> None:
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "c"}]')


def _gzip_cut(path: Path) -> None:
    data = gzip.compress("".join(json.dumps({**CHAT[0], "id": i}) + "\n" for i in range(200)).encode())
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, named", [
    ("chat.jsonl", _jsonl_with_latin1_row, "row 2 (line 3) is not UTF-8 text (byte 0xe9"),
    ("pairs.csv", _csv_latin1, "line 3 is not UTF-8 text (byte 0xe9"),
    ("alpaca.json", _json_latin1, "line 2 is not UTF-8 text (byte 0xe9"),
    ("chat.jsonl.gz", _gzip_cut, "is damaged (the file ends too early"),
])
def test_own_data_in_a_wrong_encoding_names_the_file_and_row(setup, tmp_path, capsys, name, write, named):
    path = tmp_path / name
    write(path)
    out = tmp_path / "out"
    line = fails(capsys, ["train", *overrides(setup, out), f"data.train_file={path}"])
    assert str(path) in line and named in line
    assert not out.exists()


def test_training_set_cut_short_in_gzip_names_it(setup, tmp_path, capsys):
    data = tmp_path / "data"
    folder = data / "llm_adapters" / "commonsense_15k"
    folder.mkdir(parents=True)
    packed = gzip.compress(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(300)]).encode())
    (folder / "train.json.gz").write_bytes(packed[: len(packed) // 2])
    line = fails(capsys, ["train", *overrides({**setup, "data": data}, tmp_path / "out")])
    assert f"data file '{folder / 'train.json.gz'}' is damaged" in line


# ----------------------------------------------------------------------------------------- the lock
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def _lock_held_by(directory: Path, pid: int, host: str | None = None, proc_start=None) -> Path:
    from neuroada_cli.training.run_lock import LOCK_NAME, _process_start

    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-12-04 10:00:00 UTC",
              "proc_start": proc_start if proc_start is not None else _process_start(pid), "token": "theirs",
              "command": "neuroada train recipe=first"}
    (directory / LOCK_NAME).write_text(json.dumps(record))
    return directory / LOCK_NAME


def test_second_acquire_refuses_naming_the_holder_and_release_frees_it(tmp_path):
    from neuroada_cli.training.run_lock import LOCK_NAME, acquire

    out = tmp_path / "a" / "run"
    first = acquire(out)
    with pytest.raises(UserError) as caught:
        acquire(out)
    message = str(caught.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "is in use by another run" in message
    assert str(out / LOCK_NAME) in message and "\n" not in message
    first.release()
    assert not (tmp_path / "a").exists()  # a run that wrote nothing leaves no folder behind
    acquire(out).release()


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "torn record"])
def test_a_stale_lock_is_taken_over(tmp_path, holder):
    from neuroada_cli.training.run_lock import LOCK_NAME, TORN_AFTER_S, acquire

    out = tmp_path / "run"
    if holder == "dead pid":
        _lock_held_by(out, _dead_pid())
    elif holder == "reused pid":  # our own pid, but another process start: the holder is gone
        _lock_held_by(out, os.getpid(), proc_start="1")
    else:
        out.mkdir()
        (out / LOCK_NAME).write_text("")
        old = os.stat(out / LOCK_NAME).st_mtime - TORN_AFTER_S - 5
        os.utime(out / LOCK_NAME, (old, old))
    lock = acquire(out)
    assert json.loads((out / LOCK_NAME).read_text())["token"] == lock.token
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_of_a_live_process_or_another_host_is_kept(tmp_path, live_process):
    from neuroada_cli.training.run_lock import acquire

    for out, pid, host in ((tmp_path / "live", live_process.pid, None), (tmp_path / "remote", 1, "other-host")):
        lock = _lock_held_by(out, pid, host)
        before = lock.read_text()
        with pytest.raises(UserError, match=f"pid {pid} on {host or socket.gethostname()}, started 2026-12-04"):
            acquire(out)
        assert lock.read_text() == before


def test_every_process_refuses_together(tmp_path, live_process):
    from neuroada_cli.training.run_lock import lock_run_directory

    _lock_held_by(tmp_path / "run", live_process.pid)
    shared = []

    def share(value):  # what broadcast_object_list does: process 0's value reaches every process
        shared.append(value)
        return shared[0]

    for is_main in (True, False):
        with pytest.raises(UserError, match="is in use by another run"):
            lock_run_directory(tmp_path / "run", is_main, share)


def test_a_run_on_a_directory_in_use_refuses_and_touches_nothing(setup, run, capsys, live_process):
    _lock_held_by(run, live_process.pid)
    before = tree_hash(run)
    line = fails(capsys, ["train", *overrides(setup, run, steps=6), "trainer.resume=auto"])
    assert f"pid {live_process.pid}" in line and "neuroada train recipe=first" in line
    assert tree_hash(run) == before


def test_second_run_on_one_directory_refuses_while_the_first_runs(setup, tmp_path, capsys, monkeypatch):
    """A second `neuroada train` on the directory (same process, so fast) while the first is at step 2 of 4."""
    from neuroada_cli.training.recipe import TrainingRecipe

    out = tmp_path / "out"
    original, second = TrainingRecipe.end_of_step, {}

    def end_of_step(self, done, *args):
        original(self, done, *args)
        if done == 2:
            second["before"] = tree_hash(out)
            second["line"] = fails(capsys, ["train", *overrides(setup, out, steps=6), "trainer.resume=auto"])
            second["after"] = tree_hash(out)

    monkeypatch.setattr(TrainingRecipe, "end_of_step", end_of_step)
    assert main(["train", *overrides(setup, out)]) == 0
    assert "is in use by another run" in second["line"] and f"pid {os.getpid()}" in second["line"]
    assert second["before"] == second["after"]  # the refused run touched nothing of the first
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / ".neuroada.lock").exists() and (out / "run.json").is_file()


@pytest.mark.slow
def test_second_run_on_one_directory_refuses_while_the_first_finishes(setup, tmp_path, monkeypatch):
    """Two real runs: the second starts (another process) while the first is at step 2 of 4."""
    from neuroada_cli.training.recipe import TrainingRecipe

    out = tmp_path / "out"
    original, second = TrainingRecipe.end_of_step, {}

    def end_of_step(self, done, *args):
        original(self, done, *args)
        if done == 2:
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
            second["result"] = subprocess.run(
                [sys.executable, "-m", "neuroada_cli", "train", *overrides(setup, out), "trainer.resume=auto"],
                env=env, capture_output=True, text=True, timeout=300)

    monkeypatch.setattr(TrainingRecipe, "end_of_step", end_of_step)
    assert main(["train", *overrides(setup, out)]) == 0
    result = second["result"]
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert f"is in use by another run (pid {os.getpid()}" in result.stderr
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / ".neuroada.lock").exists() and (out / "run.json").is_file()


# ---------------------------------------------------------------------------------------- leftovers
def _staging(parent: Path, target: str, pid: int, kind: str = "tmp", host: str | None = "own") -> Path:
    from neuroada_cli.atomic import HOST_TAG

    tag = "" if host is None else f"{HOST_TAG if host == 'own' else host}-"
    folder = parent / f".{target}.{kind}-{pid}-{tag}0a1b2c3d"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_the_next_export_removes_what_a_killed_export_left(run, tmp_path, live_process):
    dead = _dead_pid()
    killed = _staging(tmp_path, "merged", dead)
    old_style = _staging(tmp_path, "merged", dead, host=None)  # names of the previous release
    live = _staging(tmp_path, "merged", live_process.pid)  # a concurrent export still writing
    remote = _staging(tmp_path, "merged", dead, host="abcdef")  # another machine's writer: cannot tell
    assert main(["export", f"run={run}", f"output={tmp_path / 'merged'}"]) == 0
    assert not killed.exists() and not old_style.exists() and live.exists() and remote.exists()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_swap_killed_halfway_gets_the_old_version_back(tmp_path):
    from neuroada_cli.atomic import remove_leftovers

    dead = _dead_pid()
    aside = _staging(tmp_path, "adapter", dead, kind="old")  # moved aside, the new one never renamed in
    half = _staging(tmp_path, "adapter", dead)
    remove_leftovers(tmp_path, "adapter")
    assert (tmp_path / "adapter" / "model.safetensors").is_file() and not aside.exists() and not half.exists()


def test_a_killed_session_leaves_nothing_that_stops_or_stays_after_the_resume(setup, run, capsys):
    """kill -9 during a checkpoint write leaves its run lock and a staging folder: the resume takes the stale lock
    over, the next checkpoint write removes the folder, and the log continues without a gap."""
    dead = _dead_pid()
    lock = _lock_held_by(run, dead)
    killed = _staging(run / "checkpoints", "step-6", dead)
    assert main(["train", *overrides(setup, run, steps=6), "trainer.resume=true"]) == 0
    assert not killed.exists() and not lock.exists()
    no_temporaries(run)
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == list(range(1, 7))


# ------------------------------------------------------------------------- export on the accelerator
def test_export_merges_where_the_model_can_go():
    from helpers import tiny_llama
    from neuroada_cli import export as export_module

    model = tiny_llama()
    assert export_module.to_merge_device(model, "cpu") is model and model.device.type == "cpu"
    placed = tiny_llama().to("meta")  # already placed elsewhere (a quantised or device_map model): left there
    assert export_module.to_merge_device(placed, "cuda").device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_on_the_gpu_equals_the_cpu_merge(run, tmp_path, monkeypatch):
    """The merge on the GPU (the default there) writes the same weights as the CPU merge, bit for bit."""
    from safetensors.torch import load_file

    import neuroada_cli.export as export_module

    assert export_module.merge_device().type == "cuda"
    assert main(["export", f"run={run}", f"output={tmp_path / 'gpu'}"]) == 0
    monkeypatch.setattr(export_module, "merge_device", lambda: torch.device("cpu"))
    assert main(["export", f"run={run}", f"output={tmp_path / 'cpu'}"]) == 0
    gpu, cpu = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("gpu", "cpu"))
    assert gpu.keys() == cpu.keys() and all(torch.equal(gpu[key], cpu[key]) for key in gpu)
