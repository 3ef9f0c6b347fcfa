"""The token store: each slice's multi-scale token ids, written once so training never re-encodes.

Tokens live beside the images as ``STORE/shards/<tag>.tokens.npy``, uint16 ``(N, L)`` with
``L = Σ n_k²`` (680 at 256²), scales concatenated coarse to fine, each scale row-major.
``STORE/tokens.json`` records which tokenizer made them (file digest, scales, vocabulary), so a
store is never read with tokens from another tokenizer, and each token file's size and sha256
(``shards``), checked when a file is first opened (a corrupt one raises
:class:`~medvar_bundle.data.store.CorruptShardError`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..files import file_digest
from .store import SliceStore, read_store_json

__all__ = ["TOKENS_META", "TokenStore", "file_digest"]

TOKENS_META = "tokens.json"


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
            metas.append(read_store_json(meta_file))
        digests = {m["tokenizer_sha256"] for m in metas}
        if len(digests) > 1:
            raise ValueError(f"stores {[str(r) for r in self.roots]} were tokenized by different tokenizers")
        self.meta = metas[0]
        records = {root: meta.get("shards", {}) for root, meta in zip(self.roots, metas)}
        for i, path in enumerate(self._shard_paths):
            record = records[path.parent.parent].get(path.name)
            if record is not None:
                self._records[i]["tokens"] = record
        missing = [p for p in self._shard_paths if not Path(f"{p}.tokens.npy").exists()]
        if missing:
            raise FileNotFoundError(
                f"{missing[0]}.tokens.npy missing: tokenization was interrupted; re-run `medvar tokenize`"
            )

    def __getitem__(self, index: int) -> dict:
        index, shard, row = self._locate(index)
        item = {
            "tokens": torch.from_numpy(self._array(shard, "tokens")[row].astype(np.int64)),
            "dataset_id": int(self.dataset_ids[index]),
            "index": index,
        }
        return self.transform(item) if self.transform is not None else item
