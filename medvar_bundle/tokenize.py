"""The tokenize step (tokenizer → token store): every slice's token ids written beside its image.

`medvar tokenize` calls :func:`tokenize_store`; :class:`~medvar_bundle.data.tokens.TokenStore`
reads the tokens back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.store import SHARD_DIR, CorruptShardError, check_store, read_shard_manifests, read_store_json
from .data.tokens import TOKENS_META, file_digest
from .files import WriterLock, atomic_save_npy, atomic_write_json, check_file
from .model_file import load_tokenizer
from .runtime import autocast, model_input


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

    A shard is done when its token file matches the size and sha256 ``tokens.json`` records for
    it; a missing, truncated or corrupted token file is encoded again.

    Raises:
        FileNotFoundError: ``store`` is not a slice store.
        ValueError: the store holds tokens of another tokenizer and ``force`` is False.
        FolderLockedError: another ``tokenize`` is writing into this store.

    Returns:
        ``tokens.json`` content plus ``shards_written`` and ``shards_skipped``.
    """
    root = check_store(store)
    with WriterLock(root, "tokenize"):  # one tokenize per store; readers never wait
        digest = file_digest(tokenizer_path)
        meta_file = root / TOKENS_META
        try:
            old = read_store_json(meta_file) if meta_file.exists() else {"tokenizer_sha256": digest}
        except CorruptShardError as exc:  # every shard is encoded again, as for another tokenizer
            if not force:
                raise CorruptShardError(f"{exc}; use --force to encode every shard again") from None
            old = {"tokenizer_sha256": None}
        replaced = old["tokenizer_sha256"] != digest
        if replaced and not force:
            raise ValueError(
                f"{root}: already tokenized by another tokenizer ({old['tokenizer']}); use --force to replace"
            )
        model = load_tokenizer(tokenizer_path, device)  # a bad file stops here, before any token is deleted
        vocab = model.config["vocab_size"]
        if vocab > np.iinfo(np.uint16).max + 1:
            raise ValueError(f"vocabulary of {vocab} codes does not fit uint16 token shards")
        done = {} if replaced else old.get("shards", {})
        meta = {
            "tokenizer": str(Path(tokenizer_path).resolve()),
            "tokenizer_sha256": digest,
            "patch_nums": list(model.patch_nums),
            "vocab_size": vocab,
            "tokens_per_image": model.num_tokens,
            "shards": done,
        }
        atomic_write_json(meta_file, meta)  # first, so no record points at a token file deleted below
        if replaced:
            for p in (root / SHARD_DIR).glob("*.tokens.npy"):
                p.unlink()
        manifests = [m for m in read_shard_manifests(root) if m["num_slices"]]
        written = skipped = 0
        bar = tqdm(total=sum(m["num_slices"] for m in manifests), disable=not progress, desc="tokenize", unit="slice")
        for m in manifests:
            target = root / SHARD_DIR / f"{m['shard']}.tokens.npy"
            if m["shard"] in done and check_file(target, done[m["shard"]]) is None:
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
            done[m["shard"]] = atomic_save_npy(target, np.concatenate(rows))
            atomic_write_json(meta_file, meta)  # the token file's commit record
            written += 1
        bar.close()
        return {**meta, "shards_written": written, "shards_skipped": skipped}
