"""Labeling projects at scale: indexing 100,000 image files, and serving a batch of 50 thumbnails (issue 12).

    python benchmarks/bench_project.py | tee benchmarks/results/bench_project.txt

1. Writes ``--files`` small JPEG files (default 100,000; 32 x 32 to 48 x 48 pixels, RGB and grayscale, in a
   temporary folder, not timed) and creates a project over them (``Project.init``: each file is read once,
   hashed and decoded once into the image cache; the count of decodes is checked). Then re-indexes (nothing
   changed: no file read) and adds 1% new files (only those are read).
2. Starts the labeling server on a loopback port, queries a batch of 50 and fetches its 50 thumbnails over
   HTTP, one request after another (a browser fetches them in parallel, so this is the slow case), plus the
   page's ``/api/state``; ``--repeats`` times, reporting min / median / max.

Wall times on a shared machine: other jobs add noise; repeat and read the spread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_files(folder: Path, n: int, seed: int, start: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        side = int(rng.integers(32, 49))
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        im = Image.fromarray(arr)
        if i % 5 == 0:
            im = im.convert("L")
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        im.save(sub / f"img_{i:06d}.jpg", quality=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64, help="the project's image side")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    parser.add_argument("--keep", default=None, help="keep the files and project in this folder")
    args = parser.parse_args()

    import httpx

    from activelab.project import Project
    from activelab.project import sources as S
    from activelab.web.server import free_port, make_server

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_project_"))
    images = base / "images"
    t = time.perf_counter()
    # images in sub-folders of 1,000 (not classes: the project is created with --classes)
    write_files(images, args.files, seed=0)
    print(f"# {args.files:,} JPEG files written in {time.perf_counter() - t:.0f} s (not timed below)")
    print(f"# machine: {os.cpu_count()} CPUs, shared with other jobs; wall-clock seconds")

    decodes = []
    original = S.ImageTransform.apply

    def counting(self, data):
        decodes.append(1)
        return original(self, data)

    S.ImageTransform.apply = counting
    # sub-folder names would be classes; give the classes and treat all as unlabeled: flatten by a CSV
    csv_path = base / "files.csv"
    with open(csv_path, "w") as f:
        f.write("path,label\n")
        for p in sorted(images.rglob("*.jpg")):
            f.write(f"{p},\n")
    t = time.perf_counter()
    project = Project.init(base / "proj", labels=csv_path, classes=["a", "b", "c"], size=args.size, train={"epochs": 1})
    index_s = time.perf_counter() - t
    n_files = project.status()["files"]
    print(
        f"index {n_files:,} files ({args.size}px RGB): {index_s:.1f} s = {n_files / index_s:,.0f} files/s; "
        f"decodes {len(decodes):,} ({len(decodes) / max(n_files, 1):.2f} per file)"
    )
    decodes.clear()
    t = time.perf_counter()
    counts = project.index()
    print(f"re-index, nothing changed: {time.perf_counter() - t:.1f} s, decodes {len(decodes)}, {counts}")
    extra = args.files // 100
    write_files(images, extra, seed=1, start=args.files)
    with open(csv_path, "a") as f:
        for i in range(args.files, args.files + extra):
            f.write(f"{images / f'{i // 1000:03d}' / f'img_{i:06d}.jpg'},\n")
    decodes.clear()
    t = time.perf_counter()
    counts = project.index()
    print(f"re-index with {extra:,} new files: {time.perf_counter() - t:.1f} s, decodes {len(decodes)}, {counts}")
    S.ImageTransform.apply = original
    pixels_mb = project.pixels_path.stat().st_size / 2**20
    db_mb = (project.folder / "project.db").stat().st_size / 2**20
    print(f"image cache {pixels_mb:,.0f} MB, database {db_mb:,.1f} MB")

    batch = project.query(50, "random")
    ids = [b["id"] for b in batch]
    server, url = make_server(project.folder, port=free_port())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    thumbs, states = [], []
    with httpx.Client(base_url=url) as c:
        c.get("/api/state").raise_for_status()  # warm up
        for r in range(args.repeats):
            # a fresh batch each time, so no cache helps
            if r:
                ids = [b["id"] for b in project.query(50, "random")]
            t = time.perf_counter()
            state = c.get("/api/state")
            state.raise_for_status()
            states.append(time.perf_counter() - t)
            t = time.perf_counter()
            for fid in ids:
                c.get(f"/api/thumb/{fid}").raise_for_status()
            thumbs.append(time.perf_counter() - t)
    server.should_exit = True
    thread.join(10)

    def spread(xs):
        return f"min {min(xs):.3f} / median {statistics.median(xs):.3f} / max {max(xs):.3f} s"

    print(f"50 thumbnails, sequential HTTP requests ({args.repeats} batches): {spread(thumbs)}")
    print(f"/api/state (batch, counts, curve) over {n_files:,} files: {spread(states)}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
