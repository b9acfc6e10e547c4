"""Teacher store format (SPEC.md section 5): round trip, size, verification, resume hygiene, the c_T fallback."""

import json
import warnings

import pytest
import torch
from ssb_kernels import derive_lse_t

from ssb.store import StoreError, StoreExample, StoreWriter, TeacherStore, check_store, lse_for
from ssb.store.format import MANIFEST, lse_key, shard_name

V, K = 50, 8


def fake_example(index: int, rows: int, gen: torch.Generator, temps=(2.0,)) -> StoreExample:
    """Top-k of a real random distribution over V tokens, with exact c_T, like a backend produces."""
    logits = torch.randn(rows, V, generator=gen, dtype=torch.float64) * 3
    logp = torch.log_softmax(logits, -1)
    vals, ids = logp.topk(K, dim=-1)
    tokens = torch.randint(0, V, (rows,), generator=gen)
    return StoreExample(
        example_index=index,
        token_ids=tokens.int(),
        topk_ids=ids.int(),
        topk_logprobs=vals.float(),
        lse={t: torch.logsumexp(logp / t, -1).float() for t in temps},
        token_logprob=logp.gather(1, tokens[:, None])[:, 0].float(),
    )


def write_store(path, examples_per_shard, *, value_dtype="float32", fingerprint="fp0", skipped=None):
    header = {
        "fingerprint": fingerprint,
        "model": {"id": "tiny", "revision": None, "dtype": "float32", "vocab_size": V},
        "tokenizer": {"hash": "t", "chat_template": "c", "size": V},
        "temperatures": [1.0, 2.0],
        "exact_temperatures": [1.0, 2.0],
    }
    w = StoreWriter(path, header, k=K, value_dtype=value_dtype, temperatures=[1.0, 2.0])
    for j, exs in enumerate(examples_per_shard):
        w.write_shard(j, exs, (skipped or {}).get(j, []))
    return w.finish(len(examples_per_shard))


@pytest.fixture()
def examples():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3, 7]  # an example of one row (just the end-of-turn token) included
    return [fake_example(i, r, gen) for i, r in enumerate(lengths)]


def test_round_trip_float32(tmp_path, examples):
    shards = [examples[:2], [], examples[2:]]  # an empty shard (all its examples skipped) in the middle
    m = write_store(tmp_path, shards, skipped={1: [{"example_index": 9, "id": "x", "reason": "too long"}]})
    assert m["counts"] == {"examples": 5, "rows": 25, "skipped": 1}
    assert m["skipped"][0]["reason"] == "too long"
    store = TeacherStore(tmp_path)
    assert len(store) == 5
    for i, want in enumerate(examples):
        got = store[i]
        assert got.example_index == want.example_index
        assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.topk_ids, want.topk_ids)
        assert torch.equal(got.topk_logprobs, want.topk_logprobs)
        assert torch.equal(got.token_logprob, want.token_logprob)
        assert torch.equal(got.lse[2.0], want.lse[2.0])
        assert torch.equal(lse_for(store, 1.0, got), torch.zeros(want.rows))  # c_1 = 0 by definition


def test_loaded_tensors_are_views_of_the_mapped_file(tmp_path, examples):
    write_store(tmp_path, [examples])
    store = TeacherStore(tmp_path)
    a, b = store[0], store[2]
    # both examples slice one storage (the shard's mmap) instead of owning copies
    assert a.topk_ids.untyped_storage().data_ptr() == b.topk_ids.untyped_storage().data_ptr()
    assert a.topk_ids.untyped_storage().nbytes() == (tmp_path / shard_name(0)).stat().st_size


def test_float16_values(tmp_path, examples):
    write_store(tmp_path, [examples], value_dtype="float16")
    store = TeacherStore(tmp_path)
    got = store[2].topk_logprobs
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), examples[2].topk_logprobs, atol=0, rtol=2e-3)


def test_bytes_per_row_within_target(tmp_path):
    """8 bytes per top-k entry (int32 id + float32 value) plus at most 16 bytes per row for everything else."""
    gen = torch.Generator().manual_seed(1)
    exs = [fake_example(i, 60 + 7 * i, gen) for i in range(12)]  # realistic-ish replies: 60..137 tokens
    write_store(tmp_path, [exs[:6], exs[6:]])
    bpr = TeacherStore(tmp_path).bytes_per_row()
    assert 8 * K < bpr <= 8 * K + 16


def test_corrupt_shard_named(tmp_path, examples):
    write_store(tmp_path, [examples[:2], examples[2:]])
    f = tmp_path / shard_name(1)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside a tensor, same size
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sha256"):
        TeacherStore(tmp_path)


def test_truncated_shard_named(tmp_path, examples):
    write_store(tmp_path, [examples[:2], examples[2:]])
    f = tmp_path / shard_name(0)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: size .* \(truncated\?\)"):
        TeacherStore(tmp_path)


def test_missing_shard_and_manifest(tmp_path, examples):
    write_store(tmp_path, [examples[:2], examples[2:]])
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: shard listed .* is missing"):
        TeacherStore(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(StoreError, match="manifest.json: missing"):
        TeacherStore(tmp_path)


def test_shape_mismatch_named(tmp_path, examples):
    """A manifest that disagrees with a shard's contents (here: k) is caught even with verify=False."""
    write_store(tmp_path, [examples])
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["k"] = K + 1
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: tensor 'topk_ids' is \(25, 8\)"):
        TeacherStore(tmp_path, verify=False)


def test_writer_drops_only_its_own_temp_files(tmp_path, examples):
    write_store(tmp_path, [examples[:2], examples[2:]], fingerprint="old")
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    (tmp_path / ".shard-00002.safetensors.abc.tmp").write_bytes(b"partial")
    header = {"fingerprint": "new", "exact_temperatures": [1.0, 2.0]}
    StoreWriter(tmp_path, header, k=K, value_dtype="float32", temperatures=[1.0, 2.0])
    assert not list(tmp_path.glob(".shard-*.tmp"))  # an interrupted write of ours
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # another store's files: untouched


def test_check_store_sorts_shards_into_keep_repair_and_foreign(tmp_path, examples):
    write_store(tmp_path, [examples[:2], examples[2:]], fingerprint="same")
    assert check_store(tmp_path, "same", 2).complete
    other = check_store(tmp_path, "new", 2)  # made under other settings: all foreign, nothing to keep
    assert not other.complete and other.whole_dir_foreign
    assert set(other.foreign) == {MANIFEST, shard_name(0), shard_name(1)} and set(other.todo) == {0, 1}
    f = tmp_path / shard_name(1)
    f.write_bytes(f.read_bytes()[:-10])  # truncated: repaired in place, the sound shard kept
    repair = check_store(tmp_path, "same", 2)
    assert not repair.complete and not repair.foreign and list(repair.todo) == [1] and "truncated" in repair.todo[1]
    f.unlink()
    assert check_store(tmp_path, "same", 2).todo == {1: "shard listed in manifest.json is missing"}
    (tmp_path / MANIFEST).unlink()  # as after a capture killed before finishing: shard 0 is resumed
    resumed = check_store(tmp_path, "same", 2)
    assert resumed.resumed == 1 and resumed.todo == {1: ""} and not resumed.foreign


def test_lse_key_is_stable():
    assert lse_key(2) == "lse_T2.0" and lse_key(0.5) == "lse_T0.5"


def test_the_tail_approximation_is_exact_for_full_support_and_bounded_otherwise():
    """The c_T a store falls back on (``ssb_kernels.derive_lse_t``, via ``lse_for``)."""
    gen = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(6, V, generator=gen, dtype=torch.float64) * 2, -1)
    all_ids = torch.arange(V).expand(6, V)
    for t in (0.5, 2.0):
        exact = torch.logsumexp(logp / t, -1)
        torch.testing.assert_close(derive_lse_t(all_ids, logp, t, V), exact, atol=1e-9, rtol=0)  # k = V
        vals, ids = logp.topk(K, -1)
        approx = derive_lse_t(ids, vals.float().double(), t, V)
        # merging the tail into one token: (sum p)^(1/T) <= sum p^(1/T) for T > 1, reversed for T < 1
        assert bool((approx <= exact + 1e-6).all()) if t > 1 else bool((approx >= exact - 1e-6).all())


def test_lse_for_missing_temperature_warns_once(tmp_path, examples):
    write_store(tmp_path, [examples])
    store = TeacherStore(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [lse_for(store, 3.0, store[i]) for i in range(len(store))]
    assert len([w for w in caught if "T=3.0 was not captured" in str(w.message)]) == 1
    ex = examples[2]
    torch.testing.assert_close(got[2], derive_lse_t(ex.topk_ids, ex.topk_logprobs.double(), 3.0, V).float())
