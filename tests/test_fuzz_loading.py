"""Fuzzing the loaders (issue 22): mutated ``.pt2`` zips, engine manifests and GGUF headers.

Every outcome must be success or one ArcompileError whose message is one line: no raw
exception, no hang (each example has a deadline), and no marker file (the mutations plant
code that would create one). The runs are bounded (a few examples each, derandomized) so they
belong in the default suite; ``ARCOMPILE_FUZZ_EXAMPLES=500`` runs longer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

hypothesis = pytest.importorskip("hypothesis")
import tiny_models  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st

from arcompile.errors import ArcompileError  # noqa: E402
from arcompile.frontend.export import export_module  # noqa: E402
from arcompile.frontend.load import load_model  # noqa: E402

SCALE = int(os.environ.get("ARCOMPILE_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int):
    """Bounded: ``examples`` (each pt2 load takes about a second on 2 cores), derandomized so
    the suite is reproducible, no example database written; ARCOMPILE_FUZZ_EXAMPLES overrides."""
    return settings(max_examples=SCALE or examples, deadline=60_000, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name")


def outcome_is_clean(call, marker: Path) -> None:
    """``call()`` succeeds or raises a one-line ArcompileError; ``marker`` never appears."""
    try:
        call()
    except ArcompileError as e:
        assert "\n" not in str(e).strip(), f"multi-line error: {e}"
    finally:
        assert not marker.exists(), "a mutation ran code"


def planted(marker: Path) -> list:
    """Values that run code wherever torch or transformers would evaluate them."""
    touch = f"__import__('os').system('touch {marker}')"
    return [touch, f"({touch}, Symbol('s0', positive=True, integer=True))[1]",
            "torch.hub.load", "builtins.exec", "../../../../etc/passwd", 10**12, -1, None,
            float("nan"), [], {}, "", "a\rb", 2**63]


# --- .pt2 archives --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pt2_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "llama.pt2"
    torch.export.save(export_module(tiny_models.llama(), vocab_size=tiny_models.VOCAB), path)
    return path.read_bytes()


def json_paths(doc, prefix=()):
    """Every (path, value) in a JSON document, breadth-first, at most a few thousand."""
    out, pending = [], [(prefix, doc)]
    while pending and len(out) < 5000:
        path, value = pending.pop(0)
        out.append(path)
        if isinstance(value, dict):
            pending.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            pending.extend((path + (i,), v) for i, v in enumerate(value))
    return out


def set_path(doc, path, value):
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def rewrite_archive(src: bytes, dst: Path, edit_entry=None, extra: dict | None = None) -> Path:
    import io

    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = zin.read(info.filename)
            if edit_entry is not None:
                data = edit_entry(info.filename[len(root) + 1:], data)
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


ENTRY_NAMES = ["models/model.json", "models/model_json", "models/Model.json", "MODELS/model.json",
               "models/x.JSON", "data/weights/model_weights_config.json",
               "data/constants/model_constants_config.json", "data/aotinductor/model/x.so",
               "data/sample_inputs/model.pt", "extra/notes", "archive_version",
               "models/\u00e9.json"]


@fuzz(4)
@given(data=st.data())
def test_fuzz_pt2_program_json(data, pt2_bytes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt2")
    marker = tmp / "pwned"
    which = data.draw(st.sampled_from(["models/model.json",
                                       "data/weights/model_weights_config.json",
                                       "data/constants/model_constants_config.json"]))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(planted(marker))),
                               min_size=1, max_size=3))

    def edit(name, raw):
        if name != which:
            return raw
        doc = json.loads(raw)
        paths = json_paths(doc)
        for index, value in edits:
            doc = set_path(doc, paths[index % len(paths)], value)
        return json.dumps(doc).encode()
    path = rewrite_archive(pt2_bytes, tmp / "m.pt2", edit)
    outcome_is_clean(lambda: load_model(path, log=lambda _m: None), marker)


@fuzz(4)
@given(data=st.data())
def test_fuzz_pt2_extra_entries_and_bytes(data, pt2_bytes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pt2")
    marker = tmp / "pwned"
    import io

    with zipfile.ZipFile(io.BytesIO(pt2_bytes)) as zf:
        program = zf.read(next(n for n in zf.namelist() if n.endswith("models/model.json")))
    evil = program.replace(b"\"Symbol('s", f"\"({planted(marker)[0]}, Symbol('s".encode()) \
        .replace(b"integer=True)\"", b"integer=True))[1]\"")
    extra = {name: data.draw(st.sampled_from([evil, program, b"{}", b"\x00" * 8]))
             for name in data.draw(st.lists(st.sampled_from(ENTRY_NAMES), max_size=3,
                                            unique=True))}
    path = rewrite_archive(pt2_bytes, tmp / "m.pt2", extra=extra)
    raw = bytearray(path.read_bytes())
    for offset, byte in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                     st.integers(0, 255)), max_size=4)):
        raw[offset] = byte
    path.write_bytes(bytes(raw))
    outcome_is_clean(lambda: load_model(path, log=lambda _m: None), marker)


# --- engine manifests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory, pt2_bytes) -> Path:
    from arcompile import optimize

    src = tmp_path_factory.mktemp("fuzz-src") / "llama.pt2"
    src.write_bytes(pt2_bytes)
    out = tmp_path_factory.mktemp("fuzz-engine") / "llama"
    optimize(str(src), out, log=None)
    return out


@fuzz(15)
@given(data=st.data())
def test_fuzz_manifest(data, engine, tmp_path_factory):
    import arcompile

    tmp = tmp_path_factory.mktemp("manifest")
    marker = tmp / "pwned"
    folder = tmp / "eng"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / "arcompile.json").read_text())
    paths = json_paths(manifest)
    values = planted(marker) + ["model.onnx", "/etc/passwd", "../eng2/model.onnx", "inplace",
                                2048, 1.5, True, {"a": [[[]]]}]
    for index, value in data.draw(st.lists(st.tuples(st.integers(0, 10**6),
                                                     st.sampled_from(values)),
                                           min_size=1, max_size=3)):
        manifest = set_path(manifest, paths[index % len(paths)], value)
    text = json.dumps(manifest)
    if data.draw(st.booleans()):  # and damage the text itself
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut] + data.draw(st.sampled_from(["", "[" * 5000, "NaN", "}", "\x00"])) \
            + text[cut + 1:]
    (folder / "arcompile.json").write_text(text)
    outcome_is_clean(lambda: arcompile.load(folder), marker)


# --- GGUF headers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@fuzz(10)
@given(data=st.data())
def test_fuzz_gguf_header(data, gguf_bytes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    marker = tmp / "pwned"
    raw = bytearray(gguf_bytes)
    header = min(len(raw), 512)  # magic, version, counts, the metadata
    for offset, byte in data.draw(st.lists(st.tuples(st.integers(4, header - 1),
                                                     st.integers(0, 255)),
                                           min_size=1, max_size=6)):
        raw[offset] = byte
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(4, len(raw)))]
    path = tmp / "m.gguf"
    path.write_bytes(bytes(raw))
    outcome_is_clean(lambda: load_model(path, log=lambda _m: None), marker)
