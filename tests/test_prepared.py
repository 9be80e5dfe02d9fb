"""Phase-1 data: a corpus prepared once into llm.c-format token shards that every run memory-maps.

Real text throughout (CPython's reference documentation, written as a hub-style parquet mirror of FineWeb-Edu's
``sample/10BT`` layout), the real GPT-2 BPE, real processes killed for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmtune import config as config_lib
from lmtune.config import ConfigError
from lmtune.data import Batches
from lmtune.data.corpora import builtin_documents
from lmtune.data.prepare import Settings, prepare, source
from lmtune.data.sampler import feistel_order
from lmtune.data.shards import HEADER_INTS, ShardedTokens, open_shard, write_shard
from lmtune.data.tokenizers import gpt2_encoding
from tests.conftest import REPO, TINY

FINEWEB_README = textwrap.dedent("""\
    ---
    configs:
    - config_name: sample-10BT
      data_files:
      - split: train
        path: sample/10BT/*
    ---
    # FineWeb-Edu (a local mirror of its sample-10BT layout, built by the tests from real text)
""")


def make_fineweb_mirror(root: Path, copies: int = 1) -> list[str]:
    """HuggingFaceFW/fineweb-edu laid out as on the hub (README configs, parquet under sample/10BT/), holding the
    builtin corpus ``copies`` times; returns the documents in file order."""
    repo = root / "HuggingFaceFW" / "fineweb-edu"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text(FINEWEB_README)
    docs = [d for i in range(copies) for d in builtin_documents()] if copies > 1 else builtin_documents()
    half = len(docs) // 2
    for k, part in enumerate((docs[:half], docs[half:])):
        pq.write_table(pa.table({"text": part, "id": [f"doc-{k}-{i}" for i in range(len(part))]}),
                       repo / "sample" / "10BT" / f"00{k}_00000.parquet")
    return docs


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setenv("LMTUNE_HUB_ROOT", str(tmp_path / "mirror"))
    return make_fineweb_mirror(tmp_path / "mirror")


def shard_tokens(directory: Path, split: str) -> np.ndarray:
    index = json.loads((directory / "index.json").read_text())
    return np.concatenate([np.asarray(open_shard(directory / s["file"])) for s in index["splits"][split]])


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.bin"))}


# --- the shard format ---------------------------------------------------------------------------------


def test_a_shard_is_llm_cs_header_then_the_tokens(tmp_path):
    tokens = np.array([50256, 1, 2, 65535], dtype=np.uint16)
    write_shard(tmp_path / "a.bin", tokens, 50257)
    raw = (tmp_path / "a.bin").read_bytes()
    header = np.frombuffer(raw[:HEADER_INTS * 4], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 4] and not header[3:].any()
    assert np.frombuffer(raw[HEADER_INTS * 4:], dtype="<u2").tolist() == tokens.tolist()
    write_shard(tmp_path / "wide.bin", np.array([70000, 1]), 128_256)  # Llama-3's vocabulary: llm.c's uint32 format
    assert np.frombuffer((tmp_path / "wide.bin").read_bytes()[:12], dtype="<i4").tolist() == [20240801, 7, 2]
    assert open_shard(tmp_path / "wide.bin").tolist() == [70000, 1]


def test_sharded_tokens_read_as_one_sequence_across_shard_boundaries(tmp_path):
    whole = np.arange(1000, dtype=np.uint16)
    paths = []
    for k, (a, b) in enumerate([(0, 300), (300, 301), (301, 1000)]):
        paths.append(tmp_path / f"s{k}.bin")
        write_shard(paths[-1], whole[a:b], 50257)
    seq = ShardedTokens(paths)
    idx = np.array([[0, 1, 2], [298, 299, 300], [299, 300, 301], [997, 998, 999]])
    assert len(seq) == 1000 and np.array_equal(seq[idx], whole[idx])
    assert len(ShardedTokens(paths, limit=500)) == 500
    with pytest.raises(IndexError):
        ShardedTokens(paths, limit=500)[np.array([500])]


# --- prepare ------------------------------------------------------------------------------------------------


def test_prepare_of_a_hub_mirror_writes_tiktokens_gpt2_tokens_and_holds_out_by_hash(tmp_path, mirror):
    out = tmp_path / "prepared"
    index = prepare(source("fineweb-edu"), out, Settings(shard_tokens=30_000, workers=2, val_tokens=20_000),
                    progress=False)
    enc = gpt2_encoding()
    expected = {"train": [], "val": []}
    val_tokens = 0
    for doc in mirror:  # the rule: the first 10% of the hash space, until 20,000 tokens are held out
        ids = [enc.eot_token, *enc.encode_ordinary(doc)]
        held = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=4).digest(), "little") < 0.1 * 2**32
        if held and val_tokens < 20_000:
            ids = ids[:20_000 - val_tokens]
            val_tokens += len(ids)
            expected["val"] += ids
        else:
            expected["train"] += ids
    assert shard_tokens(out, "train").tolist() == expected["train"]
    assert shard_tokens(out, "val").tolist() == expected["val"] and len(expected["val"]) == 20_000
    assert [s.tokens for s in index.splits["train"]][:-1] == [30_000] * (len(index.splits["train"]) - 1)
    assert index.tokenizer == "gpt2" and index.source["hub"].endswith("HuggingFaceFW/fineweb-edu")
    assert sum(s.documents for s in index.splits["train"]) == sum(np.asarray(expected["train"]) == enc.eot_token)
    assert not (out / ".prepare").exists()


def test_prepare_stops_at_a_token_budget_and_is_the_same_on_every_run(tmp_path, mirror):
    a = prepare(source("fineweb-edu"), tmp_path / "a", Settings(shard_tokens=7_000, max_tokens=25_000), progress=False)
    prepare(source("fineweb-edu"), tmp_path / "b", Settings(shard_tokens=7_000, max_tokens=25_000, workers=2),
            progress=False)
    assert a.tokens("train") == 25_000 and digests(tmp_path / "a") == digests(tmp_path / "b")


def _prepare_process(out: Path, jsonl: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lmtune.data", "prepare", "files", "--files", str(jsonl), "--out",
                             str(out), "--shard-tokens", "20000", "--workers", "1", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def big_jsonl(tmp_path) -> Path:
    """The builtin corpus five times over (~700k GPT-2 tokens): long enough to be killed in the middle."""
    path = tmp_path / "docs.jsonl"
    with path.open("w") as f:
        for i in range(5):
            for d in builtin_documents():
                f.write(json.dumps({"text": f"[copy {i}]\n{d}"}) + "\n")
    return path


@pytest.mark.slow
def test_a_prepare_killed_in_the_middle_and_run_again_ends_with_the_same_shards(tmp_path, big_jsonl):
    whole = _prepare_process(tmp_path / "whole", big_jsonl)
    assert whole.wait(300) == 0, whole.stderr.read()
    killed = _prepare_process(tmp_path / "killed", big_jsonl)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((tmp_path / "killed").glob("*_train_*.bin"))) < 8:
        time.sleep(0.02)
    assert killed.poll() is None, "the prepare finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "index.json").exists() and (tmp_path / "killed" / ".prepare").is_dir()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed").glob("*.bin")}
    again = _prepare_process(tmp_path / "killed", big_jsonl)
    assert again.wait(300) == 0, again.stderr.read()
    assert digests(tmp_path / "killed") == digests(tmp_path / "whole")
    kept = [n for n, t in before.items() if (tmp_path / "killed" / n).stat().st_mtime_ns == t]
    assert len(kept) >= len(before) - 2  # finished shards were kept, not written again (at most the unsaved one)


@pytest.mark.slow
def test_two_prepares_of_one_directory_at_once_leave_one_whole_dataset(tmp_path, big_jsonl):
    whole = _prepare_process(tmp_path / "whole", big_jsonl, "--tokens", "200000")
    assert whole.wait(300) == 0
    both = [_prepare_process(tmp_path / "shared", big_jsonl, "--tokens", "200000") for _ in range(2)]
    assert [p.wait(300) for p in both] == [0, 0]
    assert any("another prepare holds" in p.stderr.read() for p in both)
    assert digests(tmp_path / "shared") == digests(tmp_path / "whole")
    assert json.loads((tmp_path / "shared" / "index.json").read_text())["complete"]


# --- training from shards ---------------------------------------------------------------------------------


def tiny(*extra: str) -> config_lib.Config:
    return config_lib.load(overrides=[*TINY, *extra], locked=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "builtin-byte"
    prepare(source("builtin"), out, Settings(tokenizer="byte", shard_tokens=50_000, val_tokens=30_000), progress=False)
    return out


def test_a_run_trains_on_prepared_shards_without_tokenizing(prepared, tmp_path, monkeypatch):
    from lmtune.data import tokenizers
    from lmtune.train import Trainer

    monkeypatch.setattr(tokenizers, "tokenize_documents", lambda *a, **k: pytest.fail("a prepared run tokenized"))
    summary = Trainer(tiny(f"data.prepared={prepared}", "train.steps=10")).fit()
    assert summary["status"] == "ok" and summary["data_source"].startswith(f"prepared {prepared}:")
    limited = Trainer(tiny(f"data.prepared={prepared}", "data.limit_tokens=5000", "train.epochs=2")).fit()
    assert limited["step"] == -(-2 * ((5000 - 1) // 32) // 4)  # two epochs over the first 5000 tokens' windows


def test_the_sampler_over_shards_is_a_permutation_resumable_and_rank_disjoint(prepared):
    tokens = ShardedTokens(sorted(prepared.glob("*_train_*.bin")))
    n = (len(tokens) - 1) // 32
    assert sorted(feistel_order(np.arange(n), n, 3, 0).tolist()) == list(range(n))
    assert not np.array_equal(feistel_order(np.arange(n), n, 3, 0), feistel_order(np.arange(n), n, 3, 1))
    one = Batches(tokens, 32, 8, seed=3, order="feistel")
    draws = [one.next()[0] for _ in range(5)]
    again = Batches(tokens, 32, 8, seed=3, order="feistel")
    again.load_state_dict(Batches(tokens, 32, 8, seed=3, order="feistel").state_dict() | {"position": 3 * 8})
    assert np.array_equal(again.next()[0], draws[3])
    ranks = [Batches(tokens, 32, 4, seed=3, rank=r, world_size=2, order="feistel") for r in range(2)]
    ids = [set(b.window_ids().tolist()) for b in ranks]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == set(one.window_ids(0).tolist())


def test_llm_c_shards_train_as_they_are(tmp_path):
    from lmtune.train import Trainer

    enc = gpt2_encoding()
    docs = builtin_documents()
    tokens = np.concatenate([[enc.eot_token, *enc.encode_ordinary(d)] for d in docs[:200]]).astype(np.uint16)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens[:20_000], 50257)  # llm.c: the first shard is validation
    write_shard(tmp_path / "fineweb_train_000001.bin", tokens[20_000:60_000], 50257)
    write_shard(tmp_path / "fineweb_train_000002.bin", tokens[60_000:], 50257)
    summary = Trainer(tiny("data.tokenizer=gpt2", f"data.prepared={tmp_path}", "train.steps=4")).fit()
    assert summary["status"] == "ok" and "llm.c shards" in summary["data_source"]


# --- bad input: one line, exit 2, before anything runs --------------------------------------------------


def broken_copy(prepared: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    copy = tmp_path / how
    shutil.copytree(prepared, copy)
    first = sorted(copy.glob("*_train_*.bin"))[0]
    if how == "missing":
        first.unlink()
    elif how == "truncated":
        first.write_bytes(first.read_bytes()[:-100])
    elif how == "magic":
        raw = bytearray(first.read_bytes())
        raw[:4] = (12345).to_bytes(4, "little")
        first.write_bytes(bytes(raw))
    elif how == "unfinished":
        index = json.loads((copy / "index.json").read_text())
        (copy / "index.json").write_text(json.dumps({**index, "complete": False}))
    return copy


@pytest.mark.parametrize("how, says", [
    ("missing", r"shard builtin_train_000000\.bin is missing"),
    ("truncated", r"token shard .*builtin_train_000000\.bin is truncated"),
    ("magic", r"is not a token shard: header magic 12345 version 1; accepted: magic 20240520"),
    ("unfinished", r"is unfinished .*python -m lmtune.data prepare builtin --tokenizer byte --out"),
    ("tokenizer", r"holds byte tokens, but data.tokenizer='gpt2'"),
    ("limit", r"data.limit_tokens=10,000,000 is more than .* holds \(\d[\d,]* training tokens\)"),
    ("absent", r"no such directory; prepare it first: python -m lmtune.data prepare builtin --tokenizer byte"),
])
def test_bad_prepared_data_is_one_line_and_exit_2_before_training(prepared, tmp_path, capsys, how, says):
    from lmtune.train import main

    where = {"tokenizer": prepared, "limit": prepared, "absent": tmp_path / "nowhere"}.get(how) or \
        broken_copy(prepared, tmp_path, how)
    extra = ["data.tokenizer=gpt2"] if how == "tokenizer" else ["data.limit_tokens=10000000"] if how == "limit" else []
    assert main([*TINY, f"data.prepared={where}", *extra, "--no-wandb", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    import re

    assert re.search(says, err[0]), err[0]
    assert not (tmp_path / "run").exists()


def test_prepare_refuses_what_it_cannot_read_in_one_line(tmp_path, capsys):
    from lmtune.data.__main__ import main

    assert main(["prepare", "files", "--files", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["prepare", "not-a-dataset", "--out", str(tmp_path / "o")]) == 2
    assert "is not accepted" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        source("files", [])


def test_shards_on_an_object_store_are_copied_once_per_node_and_checked(tmp_path, monkeypatch, prepared):
    """prepare --out s3://… uploads; a run with data.prepared=s3://… copies them into its node's cache once (the next
    run reads the copy), each shard checked against its digest."""
    from lmtune.data.prepared import local_copy, upload
    from lmtune.train import Trainer
    from tests.s3 import CREDENTIALS, local_s3

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    with local_s3("lmtune") as endpoint:
        uri = f"s3://lmtune/prepared/builtin?endpoint_override={endpoint}&scheme=http"
        upload(prepared, uri)
        cache = tmp_path / "cache"
        first = Trainer(tiny(f"data.prepared={uri}", f"data.cache_dir={cache}", "train.steps=4")).fit()
        copy = local_copy(uri, cache)
        assert first["status"] == "ok" and sorted(p.name for p in copy.glob("*.bin")) == \
            sorted(p.name for p in prepared.glob("*.bin"))
        stamps = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.bin")}
        Trainer(tiny(f"data.prepared={uri}", f"data.cache_dir={cache}", "train.steps=4")).fit()
        assert {p.name: p.stat().st_mtime_ns for p in copy.glob("*.bin")} == stamps  # read, not fetched again


def test_auto_prepares_the_dataset_once_and_reads_the_shards_after(tmp_path, capsys):
    from lmtune.train import Trainer

    cache = tmp_path / "cache"
    first = Trainer(tiny("data.prepared=auto", f"data.cache_dir={cache}", "train.steps=4")).fit()
    assert "data.prepared=auto: preparing builtin once into" in capsys.readouterr().err
    (directory,) = (cache / "prepared").iterdir()
    assert first["data_source"].startswith(f"prepared {directory}:") and not (cache / "tokens").exists()
    again = Trainer(tiny("data.prepared=auto", f"data.cache_dir={cache}", "train.steps=4")).fit()
    assert "preparing" not in capsys.readouterr().err and again["val_loss"] == first["val_loss"]


@pytest.mark.slow
def test_a_sweep_prepares_once_in_its_driver_and_no_trial_tokenizes(tmp_path):
    from tests.conftest import run_module
    from tests.helpers import rows, sweep_file

    cache = tmp_path / "cache"
    path = sweep_file(tmp_path, f"""
        sweep = Sweep(
            name="prepared", base={{**TINY_CPU, "data.prepared": "auto", "data.cache_dir": {str(cache)!r},
                                    "train.steps": 10, "train.eval_interval": 10}},
            space={{"train.seed": grid([1, 2])}}, metric="val_loss", mode="min",
        )
    """)
    proc = run_module("lmtune.sweep", str(path), "--storage", str(tmp_path / "results"), "--no-wandb",
                      "--no-dashboard", "--no-report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (prepared,) = (tmp_path / "results" / "prepared").iterdir()
    assert f"data: the trials read the shards prepared in {prepared}" in proc.stdout
    (run,) = (tmp_path / "results").glob("*-prepared-*")  # beside the storage's prepared/
    for trial_id in rows(run):
        summary = json.loads((run / "trials" / trial_id / "summary.json").read_text())
        assert summary["status"] == "ok" and summary["data_source"].startswith(f"prepared {prepared}:")
    assert not (cache / "tokens").exists() and not (cache / "prepared").exists()  # no trial tokenized or prepared


def test_a_sweep_over_shards_that_are_not_there_stops_before_ray(tmp_path):
    from tests.conftest import run_module
    from tests.helpers import sweep_file

    path = sweep_file(tmp_path, f"""
        sweep = Sweep(name="missing", base={{**TINY_CPU, "data.prepared": {str(tmp_path / 'nowhere')!r}}},
                      space={{"train.seed": grid([1])}}, metric="val_loss", mode="min")
    """)
    proc = run_module("lmtune.sweep", str(path), "--storage", str(tmp_path / "results"), cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "no such directory; prepare it first: python -m lmtune.data prepare builtin --tokenizer byte" in err[0]
    assert not (tmp_path / "results").exists()
