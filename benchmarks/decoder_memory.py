"""What a decode task holds in memory for each piece size (the job's ``--decode-piece-mib``).

The job's decode tasks (`jobs.decode_embed.decode_chunk`) are Ray streaming generators: every ``--decode-piece-mib``
of frames they hand a piece to their embed actor through the object store, at most two pieces ahead of it. This
benchmark runs a task with the same options that makes synthetic 224 px clips (8 x 224 x 224 x 3 bytes, 1.2 MB; 2 GiB
per task), stacked into pieces as `vitaclip.stages.DecodeStage.iter_batches` stacks them, and a consumer that takes
them one at a time, on an embedded Ray, once per piece size. It reports the task's anonymous memory (``RssAnon``,
sampled at each of its yields; the object store's shared memory is not counted) and the pieces received. Decoding
itself adds the clips of the video in hand (1.2 MB each at 224 px).

    python benchmarks/decoder_memory.py --piece-mib 16 32 64 128
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

CLIP_BYTES = 8 * 224 * 224 * 3
TASK_BYTES = 2 * 2**30


def _anonymous_kib() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("RssAnon")).split()[1])


def _decode(piece_bytes: int) -> Iterator[dict[str, np.ndarray]]:
    clips_per_piece = max(1, -(-piece_bytes // CLIP_BYTES))
    for i in range(TASK_BYTES // (clips_per_piece * CLIP_BYTES)):
        clips = [np.full((8, 224, 224, 3), i, np.uint8) for _ in range(clips_per_piece)]  # the rows, one by one
        yield {"frames": np.stack(clips), "anon_kib": np.asarray([_anonymous_kib()])}


def measure(piece_mib: int) -> dict[str, Any]:
    import ray

    task = ray.remote(_decode).options(num_cpus=0.5, num_returns="streaming", _generator_backpressure_num_objects=2)
    start = time.perf_counter()
    pieces, peak = 0, 0
    for ref in task.remote(piece_mib * 2**20):
        piece = ray.get(ref)
        pieces += 1
        peak = max(peak, int(piece["anon_kib"][0]))
        del piece, ref
    return {"piece_mib": piece_mib, "pieces": pieces, "decoder_mb": peak / 1024, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--piece-mib", type=int, nargs="+", default=[16, 32, 64, 128])
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'piece MiB':>9} {'pieces':>6} {'decoder MB':>10} {'seconds':>7}")
    for piece_mib in args.piece_mib:
        row = measure(piece_mib)
        print(f"{row['piece_mib']:>9} {row['pieces']:>6} {row['decoder_mb']:>10.0f} {row['seconds']:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
