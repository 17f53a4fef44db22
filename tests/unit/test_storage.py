"""Storage faults as one typed error (trainer/storage.py), and the controller's refused writes."""
import errno
from pathlib import Path

import pytest

from trainer.storage import StorageError, as_storage_error, writing


def test_a_refused_write_names_what_where_and_the_os_error():
    with pytest.raises(StorageError, match=r"could not write the marker to /x/y: \[Errno 28\] No space left on device"):
        with writing("the marker", "/x"):
            raise OSError(errno.ENOSPC, "Error writing bytes", "/x/y")


def test_only_refusals_when_the_block_also_reads():
    with pytest.raises(FileNotFoundError):
        with writing("the prepared data", "/c", refusals_only=True):
            raise FileNotFoundError(errno.ENOENT, "gone", "/data.jsonl")
    with pytest.raises(ConnectionError):
        with writing("a checkpoint", "/c"):
            raise ConnectionResetError(errno.ECONNRESET, "reset")


def test_a_bare_os_error_is_a_storage_error_only_for_refusals():
    assert as_storage_error(OSError(errno.EDQUOT, "quota", "/q")).where == "/q"
    assert as_storage_error(OSError(errno.EROFS, "read-only")).error == "[Errno 30] Read-only file system"
    assert as_storage_error(OSError(errno.ENOENT, "gone")) is None
    assert as_storage_error(ValueError("x")) is None


def test_the_failure_log_on_an_unwritable_disk_does_not_end_the_controller(tmp_path, capsys):
    from launcher.controller import Controller
    from tests.helpers import tiny_config
    from trainer.config_load import from_dict
    from trainer.messages import WorkerFailure

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "worker_failures.log").mkdir()  # a write there fails (EISDIR), as on a full disk
    cfg = from_dict(tiny_config(tmp_path, tmp_path, output_dir=str(out)))
    ctl = Controller(cfg, out)
    ctl.receive(WorkerFailure({0: "RuntimeError: boom"}, {0: "Traceback ...\nRuntimeError: boom"}))
    captured = capsys.readouterr()
    assert ctl.restarts == 1 and "could not write" in captured.out and "RuntimeError: boom" in captured.err


def test_a_storage_failure_from_a_worker_ends_the_controller(tmp_path):
    from launcher.controller import Controller
    from tests.helpers import tiny_config
    from trainer.config_load import from_dict
    from trainer.messages import StorageFailure

    cfg = from_dict(tiny_config(tmp_path, tmp_path))
    with pytest.raises(StorageError, match=r"could not write the exported model to /o/final_model: \[Errno 122\]"):
        Controller(cfg, Path(tmp_path)).receive(StorageFailure("the exported model", "/o/final_model",
                                                               "[Errno 122] Disk quota exceeded"))
