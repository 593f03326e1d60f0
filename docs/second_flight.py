"""The README's change example: a second flight of the same ground, built from one image.

    python docs/second_flight.py build OUT [--image IMAGE] [--donor DONOR]
    python docs/second_flight.py picture OUT/changes.json OUT/changes.png

``build`` writes ``OUT/before.tif`` (a copy of IMAGE), ``OUT/after.tif`` (the same pixels with
three patches pasted from DONOR at known places, its georeference shifted by a few pixels, as
two flights never register exactly), ``OUT/dates.csv`` (before 2019-06-01, after 2021-06-01) and
``OUT/patches.json`` (the pasted rectangles, pixel rows and columns of after.tif). IMAGE and
DONOR default to two of the demo's sample images (``test_tiled.tif`` and ``australia.tif``,
fetched from PyPI once; the sample images themselves are of different places, which is why the
second flight is built).

``picture`` draws what ``aerial-search changes --json`` found: before and after side by side, the
ranked after windows outlined (rank 1 thickest) and the pasted patches dashed.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

DATES = {"before.tif": "2019-06-01", "after.tif": "2021-06-01"}
SHIFT_PX = (3, 4)  # after.tif's georeference is off by 3 pixels east and 4 south
PATCH = 120  # px: a patch touches 4 to 9 windows of the 128 px grid


def build(out: Path, image: Path, donor: Path) -> dict:
    import rasterio
    from affine import Affine

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(image, out / "before.tif")
    with rasterio.open(image) as src, rasterio.open(donor) as d:
        pixels = src.read()[:3]
        profile = src.profile
        other = d.read(out_shape=(3, src.height, src.width))[:3]  # the donor resampled to this size
    h, w = pixels.shape[1:]
    # three patches: away from the edges, apart from each other
    places = [(int(h * 0.22), int(w * 0.30)), (int(h * 0.55), int(w * 0.62)), (int(h * 0.70), int(w * 0.18))]
    patches = []
    after = pixels.copy()
    for r, c in places:
        after[:, r : r + PATCH, c : c + PATCH] = other[:, r : r + PATCH, c : c + PATCH]
        patches.append({"row0": r, "row1": r + PATCH, "col0": c, "col1": c + PATCH})
    t = profile["transform"]
    profile["transform"] = t * Affine.translation(*SHIFT_PX) if not hasattr(Affine, "__matmul__") else t @ Affine.translation(*SHIFT_PX)
    profile.update(count=3, driver="GTiff", compress="deflate")  # lossless: unchanged windows stay identical
    profile.pop("photometric", None)
    with rasterio.open(out / "after.tif", "w", **profile) as dst:
        dst.write(after)
    (out / "dates.csv").write_text("path,acquired\n" + "".join(f"{k},{v}\n" for k, v in DATES.items()))
    doc = {"image": str(image), "donor": str(donor), "shift_px": list(SHIFT_PX), "patches": patches}
    (out / "patches.json").write_text(json.dumps(doc, indent=2))
    return doc


def touching(patches: list[dict], height: int, width: int) -> set[tuple[int, int]]:
    """(row, col) of the after image's grid windows that touch a pasted patch."""
    hs, ws = height // 256 * 256, width // 256 * 256
    return {(r, c) for r in range(0, hs - 255, 128) for c in range(0, ws - 255, 128) for p in patches
            if r < p["row1"] and r + 256 > p["row0"] and c < p["col1"] and c + 256 > p["col0"]}  # fmt: skip


def picture(changes: Path, dest: Path, top: int = 10) -> None:
    import rasterio
    from PIL import Image, ImageDraw

    doc = json.loads(changes.read_text())
    res = doc["results"][:top]
    after_path = Path(res[0]["image_path"]) if res else None
    before_path = Path(res[0]["before_image_path"]) if res else None
    patches = json.loads((after_path.parent / "patches.json").read_text())["patches"] if after_path else []
    panels = []
    for path, side in ((before_path, "before"), (after_path, "after")):
        with rasterio.open(path) as src:
            rgb = np.moveaxis(src.read()[:3], 0, -1)
        im = Image.fromarray(rgb).convert("RGB")
        draw = ImageDraw.Draw(im)
        for rank, r in enumerate(res, start=1):
            row, col = (r["row"], r["col"]) if side == "after" else (r["before_row"], r["before_col"])
            width = max(2, 6 - rank // 2)
            draw.rectangle([col, row, col + 255, row + 255], outline=(255, 40, 40), width=width)
            draw.text((col + 6, row + 4), f"#{rank}", fill=(255, 255, 0))
        if side == "after":
            for p in patches:
                for x in range(p["col0"], p["col1"], 12):
                    draw.line([x, p["row0"], min(x + 6, p["col1"]), p["row0"]], fill=(0, 255, 255), width=3)
                    draw.line([x, p["row1"], min(x + 6, p["col1"]), p["row1"]], fill=(0, 255, 255), width=3)
                for y in range(p["row0"], p["row1"], 12):
                    draw.line([p["col0"], y, p["col0"], min(y + 6, p["row1"])], fill=(0, 255, 255), width=3)
                    draw.line([p["col1"], y, p["col1"], min(y + 6, p["row1"])], fill=(0, 255, 255), width=3)
        draw.text((8, 8), f"{side}: {path.name} ({(res[0]['before_acquired' if side == 'before' else 'acquired'] or '')[:10]})",
                  fill=(255, 255, 255))  # fmt: skip
        panels.append(im)
    w = sum(p.width for p in panels) + 12
    canvas = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 12
    scale = min(1.0, 1400 / canvas.width)
    canvas = canvas.resize((int(canvas.width * scale), int(canvas.height * scale)))
    canvas.save(dest, quality=85) if str(dest).lower().endswith((".jpg", ".jpeg")) else canvas.save(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="before.tif, after.tif, dates.csv and patches.json in OUT")
    b.add_argument("out", type=Path)
    b.add_argument("--image", type=Path, help="the first flight (default: the demo's test_tiled.tif)")
    b.add_argument("--donor", type=Path, help="where the pasted patches come from (default: the demo's australia.tif)")
    p = sub.add_parser("picture", help="before and after with the ranked windows of changes --json")
    p.add_argument("changes", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    if args.cmd == "build":
        if args.image is None or args.donor is None:
            from pipeline.demo import sample_images

            samples = {q.name: q for q in sample_images()}
            args.image = args.image or samples["test_tiled.tif"]
            args.donor = args.donor or samples["australia.tif"]
        doc = build(args.out, args.image, args.donor)
        print(f"{args.out}/before.tif, after.tif ({len(doc['patches'])} patches pasted from {Path(doc['donor']).name}, "
              f"georeference shifted {doc['shift_px']} px), dates.csv, patches.json")  # fmt: skip
    else:
        picture(args.changes, args.dest, args.top)
        print(f"picture written to {args.dest}")


if __name__ == "__main__":
    main()
