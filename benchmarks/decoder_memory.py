"""What a decode actor holds in memory for each decoded block size (the job's ``--decoded-block-mib``).

Ray Data keeps a stage's output in the actor until a block passes the Dataset's ``target_max_block_size``, then seals
it into the object store. The job's decode stage hands its rows on every 32 MiB of frames; this benchmark runs a
stage that does the same with synthetic 224 px clips (8 x 224 x 224 x 3 bytes, 2 GiB per task, two tasks) in front
of an embed-like actor, on an embedded Ray, once per block size, and reports the decode actor's anonymous memory
(``RssAnon``, sampled at each of its yields; the object store's shared memory is not counted) and the number of
blocks the driver received. Decoding itself adds the clips of the video in hand (1.2 MB each at 224 px).

    python benchmarks/decoder_memory.py --block-mib 128 256 512 1024
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

CLIPS_PER_YIELD = 27  # 27 x 1.2 MB = 32.5 MB, as the job's decode stage hands on every 32 MiB
YIELDS_PER_TASK = 64


def _anonymous_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("RssAnon")).split()[1])


class _Decoder:
    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(YIELDS_PER_TASK):
            frames = np.full((CLIPS_PER_YIELD, 8, 224, 224, 3), i, np.uint8)
            yield {"frames": frames, "anon_kib": np.full(CLIPS_PER_YIELD, _anonymous_kib())}


class _Embedder:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"anon_kib": batch["anon_kib"]}


def measure(block_mib: int) -> dict[str, Any]:
    import ray

    ds = (
        ray.data.range(2, override_num_blocks=2)
        .map_batches(_Decoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
        .map_batches(_Embedder, batch_size=32, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    )
    ds.context.target_max_block_size = block_mib * 2**20
    ds.context.enable_progress_bars = False
    start = time.perf_counter()
    blocks, peak = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        blocks += 1
        peak = max(peak, int(batch["anon_kib"].max()))
    return {"block_mib": block_mib, "blocks": blocks, "decoder_mb": peak / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-mib", type=int, nargs="+", default=[128, 256, 512])
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'block MiB':>9} {'blocks':>6} {'decoder MB':>10} {'seconds':>7}")
    for block_mib in args.block_mib:
        row = measure(block_mib)
        print(f"{row['block_mib']:>9} {row['blocks']:>6} {row['decoder_mb']:>10.0f} {row['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
