"""Shards over HTTP and in S3 (servers started by the tests on 127.0.0.1): the same dataset and the same training
losses as the local files; a bad URL is one line; a shard whose read fails is skipped and the others finish."""

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from distill.recipe import load_recipe
from distill.train import distill
from mdcore.errors import UserInputError
from mobiledistill.cli import main
from reinforced_data.reader import open_reinforced
from reinforced_data.shards import SkipLog, resolve_shards


class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory; a path with `/flaky/` in it sends half its body, then drops the connection."""

    def log_message(self, *args):  # quiet
        pass

    def copyfile(self, source, destination):
        if "/flaky/" in self.path and self.path.endswith("1.tar"):
            destination.write(source.read(4096))
            self.close_connection = True
            raise ConnectionResetError("dropped mid-shard")
        super().copyfile(source, destination)


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_teacher_reinforced) -> dict:
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(one_teacher_reinforced, root / "dr")
    flaky = root / "flaky"
    shutil.copytree(one_teacher_reinforced, flaky)
    shutil.copy(flaky / "00000.tar", flaky / "00001.tar")  # a second shard, which the server drops halfway
    config = json.loads((flaky / "config.json").read_text())
    config["shards"] = ["00000.tar", "00001.tar"]
    (flaky / "config.json").write_text(json.dumps(config))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"root": root, "url": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def s3(one_teacher_reinforced):
    """A local S3-compatible server (moto) holding the dataset in s3://datasets/dr/, and an empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="datasets")
    client.create_bucket(Bucket="empty")
    for path in Path(one_teacher_reinforced).iterdir():
        if path.is_file():
            client.upload_file(str(path), "datasets", f"dr/{path.name}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield "s3://datasets/dr"
    patch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _samples(path) -> list:
    return [(s["key"], s["caption"], s["image_emb"], s["text_emb"]) for s in open_reinforced(path)]


def _same_samples(a: list, b: list) -> bool:
    return len(a) == len(b) > 0 and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
                                        for x, y in zip(a, b))


def test_a_dataset_over_http_and_in_s3_reads_as_the_local_one(served, s3, one_teacher_reinforced):
    local = _samples(one_teacher_reinforced)
    assert _same_samples(_samples(f"{served['url']}/dr/"), local)
    assert _same_samples(_samples(s3), local)
    assert resolve_shards(f"{served['url']}/dr/{{00000..00000}}.tar") == [f"{served['url']}/dr/00000.tar"]
    assert resolve_shards(f"{s3}/") == [f"{s3}/00000.tar"]


def test_training_from_http_and_s3_gives_the_local_losses(served, s3, one_teacher_reinforced, tmp_path):
    config = ["steps=2", "batch_size=8", "warmup_steps=1", "log_every=1", "num_workers=1"]
    losses = {}
    for name, data in (("local", str(one_teacher_reinforced)), ("http", f"{served['url']}/dr/"), ("s3", s3)):
        summary = distill(data, tmp_path / name, load_recipe(None, config), progress=False)
        rows = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows]
        assert summary["data"]["bytes_read_per_process"][0] > 0
    assert losses["http"] == losses["local"] == losses["s3"]


def test_a_shard_dropped_mid_read_is_skipped_and_the_others_finish(served):
    skips = SkipLog()
    samples = list(open_reinforced(f"{served['url']}/flaky/", skips=skips))
    assert len(samples) == len(list(open_reinforced(served["root"] / "dr")))  # all of the readable shard
    assert [s["shard"] for s in skips.shards] == [f"{served['url']}/flaky/00001.tar"]
    assert skips.shards[0]["reason"].startswith("unreadable")


@pytest.mark.parametrize("data, message", [
    ("https://nonexistent.invalid/data/", "cannot reach"),
    ("s3://empty/", "no .tar shards at s3://empty/"),
    ("s3://datasets/dr/{00000..00003}.tar", "3 of 4 shards"),
])
def test_a_bad_url_is_one_line_and_exit_2(s3, tmp_path, capsys, data, message):
    with pytest.raises(UserInputError, match=message.replace("{", r"\{").replace(".", r"\.")):
        resolve_shards(data, split="train")
    code = main(["distill", "--data", data, "--online-teacher", "md-student-tiny", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([line for line in err if not line.startswith("warning:")]) == 1 and message in err[-1]
    assert not (tmp_path / "run").exists()
