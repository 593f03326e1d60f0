"""``aerial-search demo``: real sample imagery -> ingest -> search -> result sheet, on any machine
that reaches PyPI.

The imagery is the NEON / drone sample data shipped inside the PyPI wheel of ``deepforest``
1.5.2 (MIT): four GeoTIFFs at 2-25 cm (400 x 400 to 1000 x 1000 px) and a 2299 x 2472 NEON
10 cm crop as PNG. It is fetched once with ``pip download --no-deps`` and cached.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.resources import cache_dir

DEEPFOREST = "deepforest==1.5.2"
SAMPLES = (
    "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png",
    "deepforest/data/test_tiled.tif",
    "deepforest/data/australia.tif",
    "deepforest/data/OSBS_029.tif",
    "deepforest/data/2018_SJER_3_252000_4107000_image_477.tif",
)


def sample_images(dest: Path | None = None) -> list[Path]:
    """Paths of the demo images, downloading the deepforest wheel once if needed."""
    dest = dest or cache_dir() / "samples" / DEEPFOREST.replace("==", "-")
    paths = [dest / Path(name).name for name in SAMPLES]
    if all(p.is_file() for p in paths):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching sample imagery: pip download --no-deps {DEEPFOREST} (23 MB, once)", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, DEEPFOREST]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("deepforest-*.whl"))
        if res.returncode or not wheels:
            raise RuntimeError(f"could not download {DEEPFOREST} from the package index: {res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name, path in zip(SAMPLES, paths):
                path.write_bytes(zf.read(name))
    return paths


# Pretrained networks a machine with only a package index can have, best first: on UC Merced
# (`evaluate`, benchmarks/RESULTS.md) EfficientNet-Lite0 ranks above SqueezeNet 1.1 both with l2
# (mAP 0.572 against 0.531) and with hellinger+diffusion30 (0.724 against 0.681).
OFFLINE = ("efficientnet_lite0", "squeezenet1_1")


def pick_weights(model: str) -> tuple[str, str]:
    """Real pretrained weights wherever possible: torchvision's ImageNet weights for ``model``
    (cache or download), else the first of :data:`OFFLINE` whose ImageNet weights the package
    index gives, else random."""
    from pipeline.embed import describe_weights
    from pipeline.errors import WeightsError
    from pipeline.weights import fetch

    try:
        describe_weights(model, "imagenet")
        return model, "imagenet"
    except WeightsError as e:
        print(f"ImageNet weights for {model} are not available here ({str(e)[:120]}...)", file=sys.stderr)
    errors = []
    for arch in OFFLINE:
        try:
            path = fetch(arch)
            print(f"using ImageNet {arch} from the package index instead: {path}", file=sys.stderr)
            return arch, str(path)
        except WeightsError as e:
            errors.append(f"{arch}: {e}")
    print(
        f"\n*** No pretrained weights could be had ({'; '.join(errors)}).\n"
        f"*** The demo runs with RANDOM weights: the pipeline is real, the similarity is not.\n",
        file=sys.stderr,
    )
    return model, "random"


def run(out: Path, weights: str | None, model: str, k: int) -> int:
    """Ingest the samples into ``out/demo.zarr``, search one tile, write ``out/results.json``
    and ``out/sheet.png`` (through the same driver and writers as ``aerial-search search``)."""
    from pipeline import Config, ingest
    from pipeline.render import read_tile, write_sheets
    from pipeline.search import SearchIndex
    from pipeline.search.results import write_json

    out.mkdir(parents=True, exist_ok=True)
    images = sample_images()
    if weights is None:
        model, weights = pick_weights(model)
    store_path = out / "demo.zarr"
    cfg = Config().override(**{"model.arch": model, "model.weights": weights})
    print(f"ingesting {len(images)} sample images with {model} / {weights} ...")
    report = ingest([str(p) for p in images], store_path, cfg, overwrite=True)
    print(report)
    index = SearchIndex.open(str(store_path))
    ds = index.ds
    # Query: a window a third of the way into the NEON 10 cm crop (forest and clearings).
    yell = [str(p) for p in index.image_paths].index(str(images[0].resolve()))
    sel = (ds["image"].values == yell) & ds["valid"].values
    uid = int(ds["uid"].values[sel][int(sel.sum()) // 3])
    print(f"\nsearching the {report.tiles} tiles for the {k} most similar to uid {uid} ...")
    queries, labels = index.queries_from_uids([uid])
    [result] = index.search(queries, k, diverse=True, labels=labels)
    print(result.table())
    write_json([result], out / "results.json")
    query_px = read_tile(labels[0]["image_path"], labels[0]["row"], labels[0]["col"])
    write_sheets([result], [query_px], index.provenance, out / "sheet.png")
    print(f"\ndemo done with {model} / weights '{weights}': open {out / 'sheet.png'} (and {out / 'results.json'})")
    return 0
