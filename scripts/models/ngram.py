"""The first stage of meshgate's classifier cascade: a linear model over hashed n-grams of the
encoder's own WordPiece ids, cheap enough to run on every request in pure Rust
(services/inference/src/first_stage.rs computes exactly the same features and scores).

Features of a text: its token ids as the encoder's tokenizer gives them (special tokens included,
truncated to the encoder's context); every window of `order` consecutive ids, for each order, is
hashed with 64-bit FNV-1a over the bytes [order, id0 as u32 LE, id1 as u32 LE, ...] into
`buckets` buckets; every window counts 1/sqrt(number of windows). Scores: softmax(bias + sum of
value * weights[bucket]). The file is little-endian f32: weights [buckets, labels] row-major, then
the bias [labels].
"""

import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def _fnv(h, byte):
    return (h ^ byte.astype(np.uint64)) * FNV_PRIME


def features(id_lists, orders, buckets):
    """CSR features of token-id lists: (indptr, indices, values)."""
    indices, values, indptr = [], [], [0]
    with np.errstate(over="ignore"):
        for ids in id_lists:
            ids = np.asarray(ids, dtype=np.uint64)
            rows = []
            for order in orders:
                count = len(ids) - order + 1
                if count <= 0:
                    continue
                h = np.full(count, FNV_OFFSET, dtype=np.uint64)
                h = _fnv(h, np.full(count, order, dtype=np.uint64))
                for j in range(order):
                    window = ids[j : j + count]
                    for shift in (0, 8, 16, 24):
                        h = _fnv(h, (window >> np.uint64(shift)) & np.uint64(0xFF))
                rows.append((h % np.uint64(buckets)).astype(np.int64))
            row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
            indices.append(row)
            values.append(np.full(len(row), 1.0 / np.sqrt(max(len(row), 1)), dtype=np.float32))
            indptr.append(indptr[-1] + len(row))
    return np.array(indptr, dtype=np.int64), np.concatenate(indices), np.concatenate(values)


def scores(model, feats):
    """Probabilities [n, labels] of CSR features under model = (weights [B, k], bias [k])."""
    weights, bias = model
    indptr, indices, values = feats
    contrib = weights[indices] * values[:, None]
    sums = np.add.reduceat(contrib, indptr[:-1], axis=0) if len(indices) else np.zeros((len(indptr) - 1, len(bias)))
    # reduceat gives the next row's first element for an empty row; no row is empty (special tokens).
    logits = sums + bias
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def train(feats, y, k, buckets, l2=1e-6, steps=300, lr=0.05, seed=5):
    """Softmax regression on the hashed features, full-batch Adam, balanced class weights."""
    indptr, indices, values = feats
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    counts = np.bincount(y, minlength=k).astype(np.float32)
    sample_w = (n / (k * np.maximum(counts, 1)))[y] / n
    onehot = np.eye(k, dtype=np.float32)[y]
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((buckets, k)) * 1e-3).astype(np.float32)
    bias = np.zeros(k, dtype=np.float32)
    params = [weights, bias]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        p = scores((weights, bias), feats)
        g = ((p - onehot) * sample_w[:, None]).astype(np.float32)
        per_nnz = g[rows] * values[:, None]
        grad_w = np.stack([np.bincount(indices, weights=per_nnz[:, c], minlength=buckets) for c in range(k)], axis=1)
        grads = [grad_w.astype(np.float32) + l2 * weights, g.sum(axis=0)]
        for i, gr in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * gr
            v[i] = 0.999 * v[i] + 0.001 * gr * gr
            params[i] -= (lr * (m[i] / (1 - 0.9**step)) / (np.sqrt(v[i] / (1 - 0.999**step)) + 1e-8)).astype(np.float32)
    return weights, bias


def save(model, path):
    weights, bias = model
    np.concatenate([weights.astype("<f4").ravel(), bias.astype("<f4")]).tofile(path)
