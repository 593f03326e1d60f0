"""Object storage: sources and the store on S3, against a moto S3 server on 127.0.0.1.

GDAL reads the GeoTIFFs through /vsis3 (AWS_S3_ENDPOINT), fsspec/s3fs writes and reads the Zarr
store (AWS_ENDPOINT_URL): the real S3 code paths, served locally.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import textured, write_tif

moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' s3fs for the S3 tests")
pytest.importorskip("s3fs", reason="pip install s3fs for the S3 tests")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with a bucket holding two GeoTIFFs; environment set for
    GDAL and botocore. Yields (bucket URL, {key: local copy})."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # botocore / s3fs
        "AWS_S3_ENDPOINT": f"{host}:{port}",  # GDAL /vsis3
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="imagery")
    local = tmp_path_factory.mktemp("s3src")
    files = {}
    for name, (h, w, seed) in {"flights/a.tif": (520, 640, 1), "flights/sub/b.tiff": (384, 384, 2)}.items():
        path = write_tif(local / name.replace("/", "_"), textured(h, w, seed=seed))
        client.upload_file(str(path), "imagery", name)
        files[name] = path
    client.put_object(Bucket="imagery", Key="flights/readme.txt", Body=b"not imagery")
    try:
        yield "s3://imagery", files
    finally:
        mp.undo()
        server.stop()


def test_ingest_s3_sources_into_an_s3_store_equals_local(s3, tmp_path, cfg):
    from pipeline import ingest, open_store
    from pipeline.cli import main
    from pipeline.raster import expand_sources

    bucket, files = s3
    assert expand_sources([f"{bucket}/flights/"]) == [f"{bucket}/flights/a.tif", f"{bucket}/flights/sub/b.tiff"]
    url = f"{bucket}/stores/tiles.zarr"
    report = ingest([f"{bucket}/flights/"], url, cfg)
    assert report.windows == 3 * 3 + 1 * 1
    remote = open_store(url)
    assert list(remote["image_path"].values) == [f"{bucket}/flights/a.tif", f"{bucket}/flights/sub/b.tiff"]
    assert remote["size"].values[0] == files["flights/a.tif"].stat().st_size
    local = tmp_path / "local.zarr"
    ingest([files["flights/a.tif"], files["flights/sub/b.tiff"]], local, cfg)
    ref = open_store(local)
    for name in ("uid", "valid", "lon", "lat"):
        np.testing.assert_array_equal(remote[name].values, ref[name].values)
    np.testing.assert_array_equal(remote["fingerprint"].values, ref["fingerprint"].values)

    # Search and the sheet read the store and the tiles back from S3.
    uid = str(int(remote["uid"].values[4]))
    out = tmp_path / "r.json"
    # Both test images lie on the same ground, so every tile overlaps the query: keep them.
    args = ["search", "--store", url, "--uid", uid, "-k", "3", "--include-overlapping"]
    assert main(args + ["--json", str(out), "--sheet", str(tmp_path / "s.png")]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 3 and (tmp_path / "s.png").stat().st_size > 0
    assert main(["info", "--store", url]) == 0


def test_s3_store_interrupted_run_is_invisible_then_resumed(s3, cfg, monkeypatch):
    """Object storage has no rename: an interrupted run leaves images 'pending', which search
    ignores; the rerun finishes them."""
    from pipeline import ingest, tiles
    from pipeline.search import SearchError, SearchIndex
    from pipeline.store import open_store

    bucket, _ = s3
    url = f"{bucket}/stores/resumed.zarr"
    real = tiles.embed_chunks

    def boom(*args, **kwargs):
        raise RuntimeError("client lost")

    monkeypatch.setattr(tiles, "embed_chunks", boom)
    with pytest.raises(RuntimeError, match="client lost"):
        ingest([f"{bucket}/flights/a.tif"], url, cfg)
    ds = open_store(url)
    assert ds["status"].values.astype(object).tolist() == ["pending"]
    with pytest.raises(SearchError, match="pending, not done"):
        SearchIndex.open(url).queries_from_uids([int(ds["uid"].values[0])])
    monkeypatch.setattr(tiles, "embed_chunks", real)
    report = ingest([f"{bucket}/flights/a.tif"], url, cfg)
    assert report.processed == 1 and open_store(url)["status"].values.astype(object).tolist() == ["done"]


def test_a_stac_item_collection_on_s3_with_relative_and_s3_hrefs(s3, tmp_path):
    """A STAC ItemCollection JSON on object storage (read through fsspec), its items' assets on
    S3: an s3:// href, and one relative to the JSON's own location."""
    import datetime as dt

    import boto3
    import pystac
    from shapely.geometry import box, mapping

    from pipeline import store
    from pipeline.cli import main

    bucket, _ = s3
    items = []
    for k, (href, when) in enumerate([(f"{bucket}/flights/a.tif", "2019-11-09T16:00:00"),
                                      ("../flights/sub/b.tiff", "2021-10-02T15:30:00")]):  # fmt: skip
        item = pystac.Item(f"scene-{k}", mapping(box(0, 0, 1, 1)), [0, 0, 1, 1],
                           dt.datetime.fromisoformat(when).replace(tzinfo=dt.timezone.utc), {})  # fmt: skip
        item.add_asset("visual", pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["visual"]))
        items.append(item.to_dict(include_self_link=False, transform_hrefs=False))
    doc = {"type": "FeatureCollection", "features": items}
    boto3.client("s3").put_object(Bucket="imagery", Key="stac/search.json", Body=json.dumps(doc).encode())
    path = tmp_path / "s.zarr"
    assert main(["ingest", f"{bucket}/stac/search.json", "--store", str(path), "--model", "probe", "--weights",
                 "random", "--no-progress"]) == 0  # fmt: skip
    table = store.read_table(path)
    assert table["image_path"].tolist() == [f"{bucket}/flights/a.tif", f"{bucket}/flights/sub/b.tiff"]
    assert table["item_id"].tolist() == ["scene-0", "scene-1"]
    assert np.asarray(table["acquired"], "datetime64[s]").tolist()[1] == np.datetime64("2021-10-02T15:30:00", "s").item()
