"""One run over many processes: real `torchrun --nproc-per-node 2` (gloo on CPU) and `--shard K/N` make exactly
the files of a single process, byte for byte; a rank killed mid-run loses none of the others' images and
--skip-existing completes the run; rank 0 alone reports, for everyone.

The single-process reference runs with one thread, as torchrun's processes do: on the CPU the number of threads
may change the last bit of some reductions, and so a pixel here and there."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from zimage import dist
from zimage.cli import app
from zimage.report import report_group
from zimage.jobs import Job, Settings

BIN = Path(sys.executable).parent
SMALL = ["--width", "64", "--height", "64", "--num-steps", "2", "--seed", "3"]
PROMPTS = ["a red car", "a blue boat on a calm lake at dawn", "a green tree", "a yellow sun",
           "an old lighthouse on a cliff", "a white cloud", "a black cat", "a bowl of fruit"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def generate_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model-path", str(model), "--prompts-file", str(prompts), *SMALL,
            "-o", str(out / "{index}.png"), *extra]


def torchrun(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "zimage",
            *generate_args(model, prompts, out, *extra)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comparable(records: list[dict]) -> list[dict]:
    """Records without their timings, files by name."""
    return [{**{k: v for k, v in r.items() if k != "seconds"}, "path": Path(r["path"]).name} for r in records]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The run made by one process (one thread): its prompts file, files and --json records."""
    root = tmp_path_factory.mktemp("reference")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = subprocess.run([str(BIN / "zimage"), *generate_args(tiny, prompts, root / "out", "--json")],
                         capture_output=True, text=True, env=ONE_THREAD)
    assert run.returncode == 0, run.stderr
    return prompts, files(root / "out"), [json.loads(line) for line in run.stdout.splitlines()]


def test_torchrun_makes_the_files_of_one_process(tiny, tmp_path, reference):
    prompts, expected, records = reference
    out = tmp_path / "out"
    run = subprocess.run(torchrun(tiny, prompts, out, "--json"), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert files(out) == expected
    got = [json.loads(line) for line in run.stdout.splitlines()]  # rank 0 only, every record, in job order
    assert comparable(got) == comparable(records)
    assert run.stderr.count(f"{len(PROMPTS)} image(s) written, 0 skipped, 0 failed by 2 processes") == 1


def test_shards_together_make_one_run(tiny, tmp_path, reference):
    prompts, expected, _ = reference
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        made = []
        for k in range(3):
            before = set(files(out)) if out.exists() else set()
            result = CliRunner().invoke(app, generate_args(tiny, prompts, out, "--shard", f"{k}/3"))
            assert result.exit_code == 0, result.stderr
            made.append(set(files(out)) - before)
    finally:
        torch.set_num_threads(threads)
    assert all(made) and sum(len(m) for m in made) == len(PROMPTS)  # disjoint, none empty
    assert files(out) == expected


def rank_process(launcher: subprocess.Popen, rank: int):
    psutil = pytest.importorskip("psutil")
    while True:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        assert launcher.poll() is None, "torchrun ended before its ranks were seen"
        time.sleep(0.05)


def test_killing_one_rank_keeps_the_other_images_and_skip_existing_completes(tiny, tmp_path, reference):
    prompts, expected, _ = reference
    out = tmp_path / "out"
    launcher = subprocess.Popen(torchrun(tiny, prompts, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    victim = rank_process(launcher, 1)
    while launcher.poll() is None and not (out.exists() and any(out.glob("*.png"))):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    stdout, _ = launcher.communicate()
    assert launcher.returncode != 0
    assert stdout == b""  # no rank reported a run that did not finish
    kept = {k: v for k, v in files(out).items() if k.endswith(".png")}
    assert kept and len(kept) < len(PROMPTS)
    assert all(expected[name] == digest for name, digest in kept.items())  # every image on disk is whole
    again = subprocess.run(torchrun(tiny, prompts, out, "--skip-existing"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "skipped, 0 failed by 2 processes" in again.stderr
    assert files(out) == expected


# ------------------------------------------------------------------------------ the split and the report

def job(index: int, width: int = 64, steps: int = 2) -> Job:
    return Job(Settings(prompt=f"p{index}", width=width, num_steps=steps, seed=index), Path(f"{index}.png"),
               index, f"line {index}", "model")


def test_split_is_deterministic_disjoint_and_balanced_by_work():
    batches = [[job(0, 1024, 8)], *[[job(i)] for i in range(1, 9)]]  # one big batch, eight small ones
    shares = [dist.share(batches, dist.Shard(rank, 3)) for rank in range(3)]
    assert sorted(j.index for s in shares for b in s for j in b) == list(range(9))
    assert shares[0] == [[batches[0][0]]]  # the big batch fills rank 0; the others share the rest
    assert [len(s) for s in shares[1:]] == [4, 4]
    assert shares == [dist.share(batches, dist.Shard(rank, 3)) for rank in range(3)]


def test_shard_and_torchrun_compose():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert dist.current("2/3", env) == dist.Shard(5, 6, 1, True, 1, 2)
    assert dist.current(None, {}) == dist.Shard()


@pytest.mark.parametrize("value, phrase", [("3/3", "between 0 and N-1"), ("1", "K/N"), ("a/b", "K/N")])
def test_bad_shard_is_a_usage_error(tiny, tmp_path, value, phrase):
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-p", "x", *SMALL,
                                      "--shard", value, "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and phrase in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_split_run_needs_a_seed(tiny, tmp_path):
    result = CliRunner().invoke(app, ["generate", "--model-path", str(tiny), "-p", "x", "--shard", "0/2",
                                      "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "--seed" in result.stderr


def test_rank_0_reports_a_rank_that_failed_or_went_silent(capsys, caplog, monkeypatch):
    rec = {"index": 1, "path": "1.png", "seconds": 0.1}
    results = [{"records": [{"index": 0, "path": "0.png", "skipped": True}], "failed": 0, "code": 0},
               {"records": [rec], "failed": 0, "code": 1}, None]
    log = logging.getLogger("zimage")  # the CLI's logger does not propagate to the root, where caplog listens
    monkeypatch.setattr(log, "handlers", [caplog.handler])
    monkeypatch.setattr(log, "level", logging.INFO)
    assert report_group(results, True, 1.0) == 1
    out, err = capsys.readouterr()
    assert [json.loads(line)["index"] for line in out.splitlines()] == [0, 1]
    assert "1 image(s) written, 1 skipped, 0 failed by 3 processes" in caplog.text
    assert "rank 1 failed (exit code 1)" in err and "rank 2 stopped answering" in err
    assert "--skip-existing" in err


def test_rank_0_stops_waiting_for_a_silent_rank():
    """A rank whose heartbeat stops is given up after the timeout instead of waited for forever."""
    import threading

    import torch.distributed as td

    store = td.TCPStore("127.0.0.1", free_port(), 1, True, wait_for_workers=False)
    group = dist.Group.__new__(dist.Group)
    group.shard, group.limit, group.store = dist.Shard(0, 3, 0, True, 0, 3), 0.5, td.PrefixStore("zimage", store)
    group.lock = threading.Lock()
    store.set("zimage/result/1", json.dumps({"records": [], "failed": 0, "code": 0}))
    assert group.wait("result", [1, 2]) == {1: json.dumps({"records": [], "failed": 0, "code": 0}), 2: None}


def test_a_prompts_features_do_not_depend_on_the_other_prompts_of_the_run(tiny):
    """A split or resumed run encodes only some of the prompts; each must come out bit for bit as in the
    whole run (batched with padding, some did not)."""
    from zimage.pipeline import Options, Pipeline

    prompts = ["a cat", "a red car parked by the sea at dusk", "a tree", "a bowl of fruit", "two dogs",
               "an old lighthouse on a cliff at night, stormy sea", "a tiny blue boat on a calm lake, mist", "a sun"]
    pipe = Pipeline(Options(tiny, torch.device("cpu"), torch.float32))
    together = pipe.encode(prompts)
    for p in prompts:
        assert torch.equal(together[p], pipe.encode([p])[p]), p
