"""A training data stream that a resumed run can re-enter exactly where it stopped.

Detectron2's training loader reads an infinite shuffled stream of images, augments each one
with the global NumPy RNG of the process that maps it (a data-loader worker, seeded when the
loader starts), and groups landscape and portrait images into batches. After a restart none of
that state survives: the augmentation RNG starts again, and the half-filled aspect-ratio
buckets are lost. Here

- every element of the stream carries its position, and is mapped with the RNGs (NumPy, Python,
  torch CPU) seeded from ``(seed, position)``: the same image, flip, scale and crop at that
  position in any run, with any number of workers;
- :func:`replay_grouping` recomputes from the images' sizes alone (nothing is loaded) which
  positions the first ``n`` batches of a process used and which were waiting in its buckets.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler

MAX_MAPPING_ATTEMPTS = 10


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's infinite shuffled sampler, yielding ``(position, index)`` pairs.

    ``position`` counts elements of the whole stream (all processes); process ``r`` of ``w``
    reads positions ``r, r + w, ...``. ``skip`` drops that many of this process's elements, so a
    resumed run continues with exactly the images an uninterrupted run would read next.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int | None = None, skip: int = 0) -> None:
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first = self.skip * self._world_size + self._rank
        yield from itertools.islice(enumerate(self._infinite_indices()), first, None, self._world_size)


@contextlib.contextmanager
def seeded_rngs(*key: int) -> Iterator[None]:
    """Seed NumPy's, Python's and torch's (CPU) global RNGs from ``key``; restore them after."""
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


class PositionSeededDataset(torch.utils.data.Dataset):
    """``mapper(dicts[index])`` for a ``(position, index)`` item, with RNGs seeded by position.

    Like Detectron2's ``MapDataset``, a mapper that returns ``None`` (an image it cannot use) is
    retried on another image, here chosen from ``(seed, position, attempt)`` so that the retry too
    is the same in every run.
    """

    def __init__(self, dicts: list[dict[str, Any]], mapper: Callable[[dict], Any], seed: int) -> None:
        self._dicts = DatasetFromList(dicts, copy=False)
        self._mapper = mapper
        self._seed = seed
        # Detectron2's AspectRatioGroupedDataset: bucket 0 if width > height, else 1 (it needs the
        # sizes; without aspect-ratio grouping they may be absent)
        sized = all("width" in d and "height" in d for d in dicts)
        self.bucket = (
            np.array([0 if d["width"] > d["height"] else 1 for d in dicts], dtype=np.int8) if sized else None
        )

    def __len__(self) -> int:
        return len(self._dicts)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        position, index = item
        for attempt in range(MAX_MAPPING_ATTEMPTS):
            with seeded_rngs(self._seed, position, attempt):
                mapped = self._mapper(self._dicts[index])
                if mapped is not None:
                    return mapped
                index = int(np.random.randint(len(self._dicts)))
        raise RuntimeError(
            f"the data mapper returned None for {MAX_MAPPING_ATTEMPTS} images in a row (stream position "
            f"{position}); check the dataset and the mapper"
        )


def replay_grouping(
    sampler: ResumableTrainingSampler, bucket: np.ndarray, batch_size: int, batches: int
) -> tuple[int, list[list[tuple[int, int]]]]:
    """This process's state after ``batches`` aspect-ratio-grouped batches.

    Returns how many of its stream elements were read, and the ``(position, index)`` items that
    were waiting in the two buckets, in order.
    """
    saved, sampler.skip = sampler.skip, 0
    try:
        buckets: list[list[tuple[int, int]]] = [[], []]
        done = 0
        read = 0
        if batches <= 0:
            return 0, buckets
        for read, item in enumerate(sampler, start=1):  # noqa: B007
            b = buckets[int(bucket[item[1]])]
            b.append(item)
            if len(b) == batch_size:
                b.clear()
                done += 1
                if done == batches:
                    break
        return read, buckets
    finally:
        sampler.skip = saved
