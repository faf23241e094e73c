"""How a dataset's samples are split into train, validation and test, and how a user gives
their own split or takes mcp's.

Every dataset is a *pool*: all its samples in a fixed order (for IDX files, the training
pair's images then the test pair's; for torchvision datasets, the training set then the
test set; for an image folder, its files as ``train/``, ``val/``, ``test/`` (when present)
list them, each sorted by class and name). A split assigns pool indices to parts:

1. a split file (``--split-file``) gives the parts itself: ``train`` and ``test``, and
   ``val`` or not;
2. else the data's own parts are kept: an IDX test pair, torchvision's test set, an image
   folder's ``test/`` and ``val/`` folders;
3. what is still missing is held out, stratified by class with a fixed seed (0, never the
   training seed): the test part is 20% of the pool, then the validation part is
   ``val_fraction`` (10% by default) of what remains, and the rest is the training part.

A split file is JSON (or YAML) with the lists ``train``, ``test`` and optionally ``val``
of pool indices (integers) or, for an image folder, of file paths relative to the data
folder. The parts may not overlap; samples in no part are not used. ``mcp split`` (and
:func:`write_split`) writes the split mcp would make, in the same format, so that a model
can be trained outside mcp on exactly its training part.

The test part's *fingerprint* (16 hex digits of a SHA-256 over its images and labels,
independent of resizing, normalisation and order) is recorded on every run and registered
version, so that models compared side by side are known to be tested on the same images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mcp.errors import ConfigError

SPLIT_SEED = 0  # fixed: the split is part of the dataset, not of the experiment
TEST_FRACTION = 0.2  # for datasets that ship without a test split
PARTS = ("train", "val", "test")
FORMAT = "mcp-split/1"
SPLIT_OF_MCP = "mcp's seeded stratified split"  # how a split is described when mcp made all of it


def split_indices(n: int, fraction: float, labels: np.ndarray | None = None,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (stratified when labels are given) split into (keep, held_out) indices."""
    rng = np.random.default_rng(seed)
    if labels is None:
        perm = rng.permutation(n)
        k = max(1, int(round(n * fraction)))
        return np.sort(perm[k:]), np.sort(perm[:k])
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * fraction))
        if len(idx) > 1:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def resolve_parts(labels: np.ndarray, given: Mapping[str, np.ndarray], val_fraction: float) -> dict[str, np.ndarray]:
    """The train/val/test pool indices: the ``given`` parts kept, the missing test part
    held out of the training pool (20%, stratified), then the missing validation part (a
    ``val_fraction``, stratified). Without ``train`` given, the training pool is every
    sample of no other given part."""
    n = len(labels)
    if "train" in given:
        pool = np.asarray(given["train"], dtype=np.int64)
    else:
        taken = np.zeros(n, dtype=bool)
        for part in given.values():
            taken[np.asarray(part, dtype=np.int64)] = True
        pool = np.flatnonzero(~taken)
    parts = {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in given.items() if k != "train"}
    if "test" not in parts:
        keep, held = split_indices(len(pool), TEST_FRACTION, labels[pool])
        parts["test"], pool = pool[held], pool[keep]
    if "val" not in parts:
        keep, held = split_indices(len(pool), val_fraction, labels[pool])
        parts["val"], pool = pool[held], pool[keep]
    parts["train"] = np.sort(pool)
    return {k: parts[k] for k in PARTS}


def read_split_file(path: str | Path, size: int, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A user's split (see the module docstring) as pool indices, checked: every entry
    known, no part empty, no sample in two parts. Every problem is one line naming it."""
    p = Path(path)
    where = f"split file {str(p)!r}"
    if not p.is_file():
        raise ConfigError(f"{where} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - the parsers' errors vary
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where} is not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                          f"{first[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping with the lists train, test (and optionally val)")
    missing = [k for k in ("train", "test") if k not in data]
    if missing:
        raise ConfigError(f"{where} has no {' and no '.join(missing)} list; it needs train and test (val is "
                          f"optional: without it, validation is held out of train)")
    lookup = {name: i for i, name in enumerate(names)} if names is not None else None
    parts: dict[str, np.ndarray] = {}
    for key in PARTS:
        if key not in data:
            continue
        entries = data[key]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{where}: {key} must be a non-empty list of sample indices"
                              + (" or file paths relative to the data folder" if names is not None else ""))
        parts[key] = _indices(entries, size, lookup, f"{where}: {key}")
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1:]:
            if a in parts and b in parts:
                both = np.intersect1d(parts[a], parts[b])
                if len(both):
                    first = names[both[0]] if names is not None else int(both[0])
                    raise ConfigError(f"{where}: {len(both)} sample(s) are in both {a} and {b} (first: {first!r}); "
                                      f"the parts must not overlap")
    return parts


def _indices(entries: list, size: int, lookup: dict[str, int] | None, where: str) -> np.ndarray:
    out = []
    for e in entries:
        if isinstance(e, bool):
            raise ConfigError(f"{where} holds {e!r}, not a sample index")
        if isinstance(e, int):
            if not 0 <= e < size:
                raise ConfigError(f"{where} holds index {e}, outside the dataset's {size:,} samples (0-{size - 1})")
            out.append(e)
        elif isinstance(e, str) and lookup is not None:
            key = e.replace("\\", "/")
            key = key[2:] if key.startswith("./") else key
            if key not in lookup:
                raise ConfigError(f"{where} names {e!r}, which is not an image of the data folder (paths are "
                                  f"relative to it, e.g. {next(iter(lookup))!r})")
            out.append(lookup[key])
        else:
            allowed = "an index or a file path relative to the data folder" if lookup is not None else "an index"
            raise ConfigError(f"{where} holds {e!r}; each entry must be {allowed}")
    idx = np.asarray(out, dtype=np.int64)
    unique, counts = np.unique(idx, return_counts=True)
    if len(unique) < len(idx):
        raise ConfigError(f"{where} lists sample {int(unique[counts > 1][0])} more than once")
    return np.sort(idx)


def fingerprint(items: Callable[[], Any], labels: Sequence[str]) -> str:
    """16 hex digits of a SHA-256 over the test part's samples (``items()`` yields one
    ``bytes`` per sample, in pool order) and their class names."""
    digest = hashlib.sha256(b"mcp-test-set/1")
    for blob, label in zip(items(), labels):
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
        digest.update(str(label).encode() + b"\0")
    return digest.hexdigest()[:16]


def write_split(splits: Any, path: str | Path) -> Path:
    """Write the split of ``splits`` (a :class:`mcp.data.DataSplits`) as a split file: the
    pool indices (or, for an image folder, file paths) of its train, val and test parts,
    and what they are indices into. Train a model outside mcp on its ``train`` part, then
    give the file back with ``--split-file`` (or ``load_dataset(..., split_file=...)``)."""
    out = Path(path)
    ids = splits.sample_ids
    data: dict[str, Any] = {"format": FORMAT, "dataset": splits.name, "how": splits.how, "samples": splits.pool_size,
                            "order": splits.order, "test_fingerprint": splits.test_fingerprint}
    for part in PARTS:
        idx = splits.parts[part]
        data[part] = [ids[i] for i in idx] if ids is not None else [int(i) for i in idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
    return out
