"""Push → pull through a loopback stand-in for the Hugging Face Hub, offline loading, refusals, LoRA export.

`FakeHub` is a small HTTP server implementing the endpoints the real huggingface_hub client calls (repo creation,
YAML validation, preupload, ndjson commits, repo info, tree listing, ``resolve`` downloads). The tests point
``HF_ENDPOINT`` at it, so every push and pull below runs huggingface_hub's own client code. It answers every
preupload with upload mode "regular" (content inline in the commit, as the Hub does for small files), so the
LFS/Xet storage protocols are the one part of the client not exercised.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, constants

from d3pm_hub import D3PMPipeline
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.hub import (
    NotLowRankError,
    export_lora,
    load_delta,
    lora_factors,
    push_delta,
    push_deltas,
    push_pipeline,
    resolve_folder,
)

from .conftest import tiny_pipeline

REPO_ID = "org/tiny-d3pm"
TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
TO_V = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class FakeHub(ThreadingHTTPServer):
    """An in-memory Hub: ``repos[repo_id] = {"refs": {branch: sha}, "commits": {sha: {path: bytes}}}``.

    ``requests`` logs ``(method, path)`` of every request, so tests can assert what was (not) downloaded.
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["refs"].get(revision, revision)]

    def downloaded(self) -> list[str]:
        """Paths in the repos fetched by GET or HEAD on ``resolve``."""
        return [re.sub(r"^/[^/]+/[^/]+/resolve/[^/]+/", "", path) for _, path in self.requests if "/resolve/" in path]


class FakeHubHandler(BaseHTTPRequestHandler):
    """Routes requests to the Hub endpoints huggingface_hub uses."""

    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, code: str, headers: dict | None = None, head: bool = False) -> None:
        self._send(404, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **(headers or {})}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _commit_of(self, repo_id: str, revision: str) -> str | None:
        repo = self.server.repos[repo_id]
        revision = unquote(revision)
        return repo["refs"].get(revision) or (revision if revision in repo["commits"] else None)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self.server.requests.append(("POST", path))
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            url = f"{self.server.url}/{repo_id}"
            if repo_id in self.server.repos:
                return self._json({"error": "You already created this model repo", "url": url}, 409)
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            sha = _sha1(repo_id.encode())
            self.server.repos[repo_id] = {"refs": {"main": sha}, "commits": {sha: initial}}
            return self._json({"url": url})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if match is None or match[1] not in self.server.repos:
            return self._not_found("RepoNotFound")
        repo_id, action, revision = match.groups()
        parent = self._commit_of(repo_id, revision)
        if parent is None:
            return self._not_found("RevisionNotFound")
        if action == "preupload":
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._json({"files": modes, "commitOid": parent})
        files = dict(self.server.repos[repo_id]["commits"][parent])
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._json({"error": f"unsupported commit operation {item['key']}"}, 400)
        sha = _sha1(parent.encode() + body)
        repo = self.server.repos[repo_id]
        repo["commits"][sha] = files
        repo["refs"][unquote(revision)] = sha
        return self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}"})

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def _get(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append(("HEAD" if head else "GET", path))
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path) or re.fullmatch(
            r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path
        )
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = match or resolve
        if match is None or match[1] not in self.server.repos:
            return self._not_found("RepoNotFound", head=head)
        repo_id, revision = match[1], match[2] or "main"
        sha = self._commit_of(repo_id, revision)
        if sha is None:
            return self._not_found("RevisionNotFound", head=head)
        files = self.server.repos[repo_id]["commits"][sha]
        if resolve is not None:
            content = files.get(resolve[3])
            if content is None:
                return self._not_found("EntryNotFound", {"X-Repo-Commit": sha}, head)
            etag = f'"{_sha1(content)}"'
            return self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag}, head)
        if "/tree/" in path:
            entries = [{"type": "file", "path": p, "size": len(c), "oid": _sha1(c)} for p, c in sorted(files.items())]
            return self._json(entries)
        return self._json({"id": repo_id, "sha": sha, "private": False, "siblings": [{"rfilename": p} for p in files]})


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    """A running FakeHub with huggingface_hub pointed at it (online) and a fresh cache under ``tmp_path``."""
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # huggingface_hub reads these once at import; set the environment and the values it already read.
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_loopback")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # The module-level HfApi behind huggingface_hub.create_repo / upload_folder (used by diffusers' push_to_hub).
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)
    yield server
    server.shutdown()
    server.server_close()


def make_delta(pipeline: D3PMPipeline, digit: int = 9, seed: int = 0) -> ConceptDelta:
    """A rank-1 edit of two cross-attention key/value matrices, in the ConceptDelta format."""
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(pipeline.unet.named_parameters())
    increments = {}
    for name in (TO_K, TO_V):
        out_features, in_features = parameters[name].shape
        u, v = torch.randn(out_features, 1, generator=generator), torch.randn(1, in_features, generator=generator)
        increments[name] = 0.1 * u @ v
    metrics = {"erased_digit_rate": 0.012, "other_digits_accuracy": 0.987, "erase_seconds": 0.5}
    hyperparameters = {"ridge": 0.1, "target": "null"}
    return ConceptDelta.create(pipeline.unet, increments, [digit], "closed-form", hyperparameters, "local", metrics)


def _state(pipeline: D3PMPipeline) -> dict[str, torch.Tensor]:
    return pipeline.unet.state_dict()


def test_pipeline_and_delta_round_trip(hub, tmp_path):
    pipeline = tiny_pipeline()
    pipeline_commit = push_pipeline(pipeline, REPO_ID)
    assert re.fullmatch(r"[0-9a-f]{40}", pipeline_commit)
    pushed = set(hub.files(REPO_ID))
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= pushed
    assert all(path.endswith((".safetensors", ".json", ".gitattributes")) for path in pushed)

    loaded = D3PMPipeline.from_pretrained(REPO_ID, revision=pipeline_commit)
    for name, value in _state(pipeline).items():
        assert torch.equal(_state(loaded)[name], value), name

    delta_file = make_delta(pipeline).save(tmp_path / "digit-9.safetensors")
    delta_commit = push_delta(delta_file, REPO_ID)
    assert delta_commit != pipeline_commit
    card = hub.files(REPO_ID)["deltas/closed-form/digit-9.md"].decode()
    assert "base_model: org/tiny-d3pm" in card and "0.012" in card

    pulled = load_delta(REPO_ID, "deltas/closed-form/digit-9.safetensors", pipeline=loaded)
    local = ConceptDelta.load(delta_file)
    assert pulled.metadata["base_model"] == REPO_ID
    assert pulled.metadata["base_revision"] == pipeline_commit
    assert pulled.metadata["base_model_hash"] == local.metadata["base_model_hash"]
    for name, value in local.tensors.items():
        assert torch.equal(pulled.tensors[name], value)
    composed = compose_parameters(loaded.unet, [pulled])
    assert torch.allclose(composed[TO_K], _state(pipeline)[TO_K] + local.tensors[TO_K])


def test_pulling_the_pipeline_skips_deltas_and_other_files(hub):
    push_pipeline(tiny_pipeline(), REPO_ID)
    HfApi().create_commit(
        REPO_ID,
        [
            CommitOperationAdd("unet/diffusion_pytorch_model.bin", b"pickled weights"),
            CommitOperationAdd("exploit.pkl", b"pickle"),
            CommitOperationAdd("deltas/naive/digit-1.safetensors", b"not fetched with the pipeline"),
        ],
        commit_message="non-safetensors files",
    )
    folder = resolve_folder(REPO_ID)
    assert not any(p.suffix in (".bin", ".pkl") for p in folder.rglob("*"))
    assert not (folder / "deltas").exists()
    assert not any(path.endswith((".bin", ".pkl")) or path.startswith("deltas/") for path in hub.downloaded())


def test_refusals_wrong_base_and_non_safetensors(hub, tmp_path):
    pipeline = tiny_pipeline()
    push_pipeline(pipeline, REPO_ID)
    push_delta(make_delta(pipeline).save(tmp_path / "d.safetensors"), REPO_ID)
    other = tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="made for another base model"):
        load_delta(REPO_ID, "deltas/closed-form/digit-9.safetensors", pipeline=other)
    with pytest.raises(ValueError, match="made for another base model"):  # nor pushed beside the wrong base
        push_delta(make_delta(other).save(tmp_path / "other.safetensors"), REPO_ID)

    HfApi().create_commit(REPO_ID, [CommitOperationAdd("deltas/evil.pt", b"pickle")], commit_message="a .pt")
    requests_before = len(hub.requests)
    for filename in ("deltas/evil.pt", "deltas/closed-form/digit-9.md", "deltas/weights.bin"):
        with pytest.raises(ValueError, match="safetensors files only"):
            load_delta(REPO_ID, filename)
    assert len(hub.requests) == requests_before, "a refused file must not be requested"


def test_two_files_for_one_repo_path_are_refused_before_anything_is_pushed(hub, tmp_path):
    pipeline = tiny_pipeline()
    first = make_delta(pipeline).save(tmp_path / "a.safetensors")
    second = make_delta(pipeline).save(tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="would both be pushed to deltas/closed-form/digit-9.safetensors"):
        push_deltas([first, second], "org/duplicates")
    assert "org/duplicates" not in hub.repos


def test_diffusers_push_to_hub_uploads_safetensors_only(hub):
    pipeline = tiny_pipeline()
    pipeline.push_to_hub("org/via-mixin")
    files = set(hub.files("org/via-mixin"))
    assert "unet/diffusion_pytorch_model.safetensors" in files and "README.md" in files
    assert all(path.endswith((".safetensors", ".json", ".md", ".gitattributes")) for path in files)
    loaded = D3PMPipeline.from_pretrained("org/via-mixin")
    assert torch.equal(_state(loaded)[TO_K], _state(pipeline)[TO_K])


def test_offline_cache_loads_and_missing_files_fail_fast(hub, tmp_path, monkeypatch):
    pipeline = tiny_pipeline()
    push_pipeline(pipeline, REPO_ID)
    push_delta(make_delta(pipeline).save(tmp_path / "d.safetensors"), REPO_ID)
    D3PMPipeline.from_pretrained(REPO_ID)  # populate the cache online
    load_delta(REPO_ID, "deltas/closed-form/digit-9.safetensors")
    hub.shutdown()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    cached = D3PMPipeline.from_pretrained(REPO_ID)
    assert torch.equal(_state(cached)[TO_K], _state(pipeline)[TO_K])
    delta = load_delta(REPO_ID, "deltas/closed-form/digit-9.safetensors", pipeline=cached)
    assert delta.concepts == [9]

    for attempt in (
        lambda: load_delta(REPO_ID, "deltas/closed-form/digit-3.safetensors"),
        lambda: D3PMPipeline.from_pretrained("org/never-downloaded"),
    ):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
            attempt()
        assert time.perf_counter() - start < 2.0


def test_local_delta_paths(tmp_path):
    pipeline = tiny_pipeline()
    path = make_delta(pipeline).save(tmp_path / "digit-9.safetensors")
    assert load_delta(path, pipeline=pipeline).concepts == [9]
    assert load_delta(tmp_path, "digit-9.safetensors").concepts == [9]
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="safetensors files only"):
        load_delta(Path(str(path) + ".pt"))


def test_lora_export_round_trip(tmp_path):
    pipeline = tiny_pipeline()
    delta = make_delta(pipeline)
    factors = export_lora(delta, pipeline.unet, tmp_path / "lora")
    assert [(f.name, f.rank) for f in factors] == [(TO_K, 1), (TO_V, 1)]
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    module = "base_model.model." + TO_K.removesuffix(".weight")
    lora_a, lora_b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    assert lora_a.shape == (1, delta.tensors[TO_K].shape[1]) and lora_b.shape == (delta.tensors[TO_K].shape[0], 1)
    assert torch.allclose(lora_b @ lora_a, delta.tensors[TO_K], atol=1e-6)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 1
    assert sorted(config["target_modules"]) == sorted(name.removesuffix(".weight") for name in (TO_K, TO_V))


def test_lora_export_conv_and_embedding_and_refusals(tmp_path):
    pipeline = tiny_pipeline()
    unet = pipeline.unet
    generator = torch.Generator().manual_seed(0)
    conv, embedding = "unet.conv_in.weight", "label_embedding.weight"
    conv_shape, embedding_shape = unet.get_parameter(conv).shape, unet.get_parameter(embedding).shape
    low_rank = {
        conv: (torch.randn(conv_shape[0], 2, generator=generator) @ torch.randn(2, conv_shape[1:].numel())).reshape(
            conv_shape
        ),
        embedding: torch.zeros(embedding_shape).index_fill_(0, torch.tensor([9]), 0.5),
    }
    delta = ConceptDelta.create(unet, low_rank, [9], "test")
    factors, tensors = lora_factors(delta, unet)
    assert {f.name: (f.layer, f.rank) for f in factors} == {conv: ("conv", 2), embedding: ("embedding", 1)}
    conv_module = "base_model.model.unet.conv_in"
    conv_a, conv_b = tensors[f"{conv_module}.lora_A.weight"], tensors[f"{conv_module}.lora_B.weight"]
    assert conv_a.shape == (2, *conv_shape[1:]) and conv_b.shape == (conv_shape[0], 2, 1, 1)
    assert torch.allclose((conv_b.flatten(1) @ conv_a.flatten(1)).reshape(conv_shape), low_rank[conv], atol=1e-5)
    embed_a = tensors["base_model.model.label_embedding.lora_embedding_A"]
    embed_b = tensors["base_model.model.label_embedding.lora_embedding_B"]
    assert torch.allclose((embed_b @ embed_a).T, low_rank[embedding], atol=1e-6)

    full_rank = {
        TO_K: torch.randn(unet.get_parameter(TO_K).shape, generator=generator),  # an ESD-u-like dense increment
        "shared_context_tokens": torch.ones_like(unet.shared_context_tokens),  # no LoRA for free parameters
    }
    with pytest.raises(NotLowRankError, match="needs rank 16 of 16") as error:
        export_lora(ConceptDelta.create(unet, full_rank, [9], "esd-u"), unet, tmp_path / "refused")
    assert "shared_context_tokens" in str(error.value)
    assert not (tmp_path / "refused").exists()


def test_cli_push_pull_and_cards(hub, tmp_path, capsys):
    from d3pm_hub.cli import main

    from .test_cards import EVALUATION, shipped_layout

    pretrained = shipped_layout(tmp_path)
    main(["cards", "--pretrained", str(pretrained)])
    main(["cards", "--pretrained", str(pretrained), "--check"])
    main(["push", REPO_ID, "--pipeline", str(pretrained / "d3pm-mnist"), "--deltas", str(pretrained / "deltas")])
    commits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    files = hub.files(REPO_ID)
    readme = files["README.md"].decode()
    assert f'from_pretrained("{REPO_ID}")' in readme and str(EVALUATION["mean_accuracy"]) in readme
    assert "deltas/closed-form/digit-9.md" in files and "eval.json" in files
    assert ("POST", "/api/validate-yaml") in hub.requests

    main(["pull", REPO_ID, "deltas/closed-form/digit-9.safetensors", "--base", REPO_ID])
    assert "matches the base" in capsys.readouterr().out
    pulled = load_delta(REPO_ID, "deltas/closed-form/digit-9.safetensors")
    assert pulled.metadata["base_revision"] == commits["pipeline_commit"]
    main(["pull", REPO_ID])
    assert Path(capsys.readouterr().out.strip(), "model_index.json").is_file()
