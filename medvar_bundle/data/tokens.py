"""The token store: each slice's multi-scale token ids, written once so training never re-encodes.

Tokens live beside the images as ``STORE/shards/<tag>.tokens.npy``, uint16 ``(N, L)`` with
``L = Σ n_k²`` (680 at 256²), scales concatenated coarse to fine, each scale row-major.
``STORE/tokens.json`` records which tokenizer made them (file digest, scales, vocabulary), so a
store is never read with tokens from another tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .store import SHARD_DIR, SliceStore, atomic_save_npy, atomic_write_json, read_shard_manifests

TOKENS_META = "tokens.json"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TokenStore(SliceStore):
    """A slice store's token ids as a torch ``Dataset``: items ``{"tokens": LongTensor (L,),
    "dataset_id": int, "index": int}``. Same arguments and order as :class:`SliceStore`."""

    def __init__(self, roots, split: str | None = None, datasets=None, transform=None) -> None:
        super().__init__(roots, split=split, datasets=datasets, transform=transform)
        metas = []
        for root in self.roots:
            meta_file = root / TOKENS_META
            if not meta_file.exists():
                raise FileNotFoundError(f"{root}: no tokens; run `medvar tokenize --store {root}` first")
            metas.append(json.loads(meta_file.read_text()))
        digests = {m["tokenizer_sha256"] for m in metas}
        if len(digests) > 1:
            raise ValueError(f"stores {[str(r) for r in self.roots]} were tokenized by different tokenizers")
        self.meta = metas[0]
        missing = [p for p in self._shard_paths if not Path(f"{p}.tokens.npy").exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}.tokens.npy missing: tokenization was interrupted; re-run `medvar tokenize`")

    def __getitem__(self, index: int) -> dict:
        index, shard, row = self._locate(index)
        item = {
            "tokens": torch.from_numpy(self._array(shard, "tokens")[row].astype(np.int64)),
            "dataset_id": int(self.dataset_ids[index]),
            "index": index,
        }
        return self.transform(item) if self.transform is not None else item


@torch.no_grad()
def tokenize_store(
    tokenizer_path: str | os.PathLike,
    store: str | os.PathLike,
    batch_size: int = 32,
    device: str = "cpu",
    bf16: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Encode every slice of ``store`` with the tokenizer; resumable shard by shard.

    Raises:
        ValueError: the store holds tokens of another tokenizer and ``force`` is False.

    Returns:
        ``tokens.json`` content plus ``shards_written`` and ``shards_skipped``.
    """
    from ..engines.common import autocast, model_input
    from ..engines.tokenizer import load_tokenizer

    root = Path(store)
    digest = file_digest(tokenizer_path)
    meta_file = root / TOKENS_META
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        if old["tokenizer_sha256"] != digest:
            if not force:
                raise ValueError(f"{root}: already tokenized by another tokenizer ({old['tokenizer']}); use --force to replace")
            for p in (root / SHARD_DIR).glob("*.tokens.npy"):
                p.unlink()
    model = load_tokenizer(tokenizer_path, device)
    vocab = model.config["vocab_size"]
    if vocab > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {vocab} codes does not fit uint16 token shards")
    meta = {
        "tokenizer": str(Path(tokenizer_path).resolve()), "tokenizer_sha256": digest, "patch_nums": list(model.patch_nums),
        "vocab_size": vocab, "tokens_per_image": model.num_tokens,
    }
    atomic_write_json(meta_file, meta)
    manifests = [m for m in read_shard_manifests(root) if m["num_slices"]]
    written = skipped = 0
    bar = tqdm(total=sum(m["num_slices"] for m in manifests), disable=not progress, desc="tokenize", unit="slice")
    for m in manifests:
        target = root / SHARD_DIR / f"{m['shard']}.tokens.npy"
        if target.exists():
            skipped += 1
            bar.update(m["num_slices"])
            continue
        images = np.load(root / SHARD_DIR / f"{m['shard']}.images.npy", mmap_mode="r")
        rows = []
        for start in range(0, len(images), batch_size):
            x = model_input(torch.from_numpy(np.array(images[start : start + batch_size])), device)
            with autocast(device, bf16):
                rows.append(model.tokens_flat(model.encode(x)).cpu().numpy().astype(np.uint16))
            bar.update(len(x))
        atomic_save_npy(target, np.concatenate(rows))
        written += 1
    bar.close()
    return {**meta, "shards_written": written, "shards_skipped": skipped}

