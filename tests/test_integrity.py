"""Corruption is found, not trained on: shard checksums, `medvar verify`, and prepare/tokenize re-doing bad shards."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import build_synthetic_store

from medvar_bundle.cli import main
from medvar_bundle.data import SliceStore, prepare_store
from medvar_bundle.data.store import CorruptShardError, read_shard_manifests, verify_store
from medvar_bundle.data.tokens import TokenStore
from medvar_bundle.tokenize import tokenize_store


def slices_by_volume(store) -> dict[str, np.ndarray]:
    """Each volume's slices, by image path, in store order."""
    ds, out = SliceStore(store), {}
    index = 0
    for m in read_shard_manifests(store):
        for v in m["volumes"]:
            out[v["image"]] = np.stack([ds[index + i]["image"].numpy() for i in range(v["num_slices"])])
            index += v["num_slices"]
    return out


def flip_byte(path, offset_from_end: int = 100) -> None:
    """Invert one byte of the array data (not the .npy header)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path):
    return build_synthetic_store(tmp_path, volumes=4, seed=7)


def test_manifest_records_size_and_sha256_of_every_shard_file(store):
    (manifest,) = read_shard_manifests(store)
    for kind in ("images", "labels"):
        path = store / "shards" / f"{manifest['shard']}.{kind}.npy"
        record = manifest["files"][kind]
        assert record == {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert verify_store(store) == []


def test_a_flipped_byte_is_refused_reported_and_prepared_again(store, capsys):
    before = slices_by_volume(store)
    (manifest,) = read_shard_manifests(store)
    images = store / "shards" / f"{manifest['shard']}.images.npy"
    flip_byte(images)
    # reading: refused with one line naming the file, before any slice of it is used
    with pytest.raises(CorruptShardError, match=rf"{images}: sha256 differs .* `medvar verify --store"):
        SliceStore(store)[0]
    # `medvar verify`: one line per bad file, exit 1; --size-only cannot see a flipped byte
    assert main(["verify", "--store", str(store)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"medvar verify: bad shard {manifest['shard']}: {images}") and len(err) == 2
    assert main(["verify", "--store", str(store), "--size-only"]) == 0
    # prepare with --verify re-does exactly that shard: same slices as before, verify clean
    datalist = [
        {"image": v["image"], "label": None, "dataset": v["dataset"], "modality": "MR", "split": v["split"]}
        for v in manifest["volumes"]
    ]
    result = prepare_store(datalist, store, size=64, progress=False, verify=True)
    assert result.counts["ok"] == len(datalist) and "re-doing shard" in capsys.readouterr().err
    assert verify_store(store) == []
    after = slices_by_volume(store)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_a_truncated_shard_is_found_by_size_alone(store):
    (manifest,) = read_shard_manifests(store)
    labels = store / "shards" / f"{manifest['shard']}.labels.npy"
    labels.write_bytes(labels.read_bytes()[:-64])
    (bad,) = verify_store(store, checksum=False)
    assert bad["file"] == str(labels) and "bytes, the manifest says" in bad["problem"]
    with pytest.raises(CorruptShardError, match="truncated or overwritten"):
        SliceStore(store)[0]["label"]


def test_a_corrupt_token_file_is_refused_and_encoded_again(store, tokenized_store):
    tokenizer = tokenized_store.parent / "tokenizer.pt"
    first = tokenize_store(tokenizer, store, batch_size=8, progress=False)
    assert first["shards_written"] == 1 and set(first["shards"]) == {read_shard_manifests(store)[0]["shard"]}
    tokens = next((store / "shards").glob("*.tokens.npy"))
    good = tokens.read_bytes()
    flip_byte(tokens, offset_from_end=3)
    with pytest.raises(CorruptShardError, match=rf"{tokens}: sha256 differs"):
        TokenStore(store)[0]
    assert [b["file"] for b in verify_store(store)] == [str(tokens)]
    again = tokenize_store(tokenizer, store, batch_size=8, progress=False)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 0
    assert tokens.read_bytes() == good and verify_store(store) == []
    assert tokenize_store(tokenizer, store, batch_size=8, progress=False)["shards_skipped"] == 1


def test_stores_written_before_the_records_still_read(store):
    (path,) = (store / "shards").glob("*.json")
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    assert SliceStore(store)[0]["image"].shape == (64, 64) and verify_store(store) == []


@pytest.mark.parametrize("damage", ["shard manifest", "tokens.json", "truncated images"])
def test_commands_answer_a_damaged_store_with_one_line_naming_the_file(damage, tokenized_store, tmp_path, capsys):
    """A shard manifest or tokens.json that is not JSON was a JSONDecodeError traceback in every command
    that read it; a truncated image shard was a CorruptShardError traceback in `preview`."""
    import shutil

    store = shutil.copytree(tokenized_store, tmp_path / "damaged")
    (manifest,) = read_shard_manifests(store)
    if damage == "shard manifest":
        bad = store / "shards" / f"{manifest['shard']}.json"
        bad.write_text("not json")
        commands = [
            ["verify", "--store", str(store)],
            ["preview", "--store", str(store), "--out", str(tmp_path / "p.png")],
        ]
    elif damage == "tokens.json":
        bad = store / "tokens.json"
        bad.write_text("{")
        commands = [["verify", "--store", str(store)]]
    else:
        bad = store / "shards" / f"{manifest['shard']}.images.npy"
        bad.write_bytes(bad.read_bytes()[:-1000])
        tokenizer = str(tokenized_store.parent / "tokenizer.pt")
        commands = [["preview", "--store", str(store), "--out", str(tmp_path / "p.png")],
                    ["evaluate-tokenizer", "--tokenizer", tokenizer, "--store", str(store), "--quiet"]]  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"medvar {argv[0]}: error: {bad}: "), err


def test_tokenize_refuses_a_folder_that_is_not_a_store_and_writes_nothing(tmp_path, capsys):
    """It answered "0 shards written" with exit 0, leaving tokens.json and a lock file in the folder."""
    from medvar_bundle.model_file import save_tokenizer
    from medvar_bundle.networks.msvqvae import MultiScaleVQVAE

    tokenizer = save_tokenizer(MultiScaleVQVAE.from_preset("tiny", image_size=64, vocab_size=64), tmp_path / "t.pt", 0)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "nowhere", tmp_path / "empty"):
        assert main(["tokenize", "--tokenizer", str(tokenizer), "--store", str(folder)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"medvar tokenize: error: {folder}: not a slice store (no datasets.json); run `medvar prepare` first"
        ]
    assert not (tmp_path / "nowhere").exists() and not any((tmp_path / "empty").iterdir())


def test_a_damaged_tokens_json_asks_for_force_and_force_encodes_again(tokenized_store, tmp_path, capsys):
    import shutil

    store = shutil.copytree(tokenized_store, tmp_path / "damaged")
    tokenizer = str(tokenized_store.parent / "tokenizer.pt")
    (store / "tokens.json").write_text("[]")  # JSON, but not the object tokenize writes
    assert main(["tokenize", "--tokenizer", tokenizer, "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"medvar tokenize: error: {store / 'tokens.json'}: not a JSON object (a list); use --force to "
                   "encode every shard again"]  # fmt: skip
    assert main(["tokenize", "--tokenizer", tokenizer, "--store", str(store), "--quiet", "--force"]) == 0
    assert json.loads((store / "tokens.json").read_text()) == json.loads((tokenized_store / "tokens.json").read_text())
