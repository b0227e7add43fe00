"""PyTorch adapter: rebuilt from the artifact alone, with ties, buffers, dtypes and training state intact."""

from __future__ import annotations

import json
import pickle
import warnings
from hashlib import sha256
from pathlib import Path
from typing import Any, ClassVar

import pytest
from contract import AdapterContract
from mlp_testkit import require, run_python

from mlpersist import (
    CorruptArtifactError,
    PersistError,
    UnsupportedModelError,
    UntrustedContentError,
    VersionMismatchError,
    inspect,
    load_any,
    save_any,
    verify,
)


def tm() -> Any:
    require("torch")
    import torch_models

    return torch_models


class TestTorch(AdapterContract):
    adapter = "torch"
    framework_module = "torch"
    mutants: ClassVar[tuple[tuple[str, int], ...]] = (("torch", 200),)

    def make_model(self) -> Any:
        torch = require("torch")
        torch.manual_seed(0)
        model = tm().MLP(4, hidden=8)
        model.train()
        model(torch.randn(32, 4))  # moves BatchNorm running statistics away from their defaults
        return model.eval()

    def make_input(self) -> Any:
        import numpy as np

        return np.random.default_rng(1).normal(size=(5, 4)).astype("float32")

    def outputs(self, model: Any, x: Any) -> Any:
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()


def same(a: Any, b: Any, x: Any) -> None:
    torch = require("torch")
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_the_module_is_built_on_the_meta_device_without_random_initialisation(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().MLP(4).eval()
    save_any(model, tmp_path / "m")
    tm().INIT_DEVICES.clear()
    loaded = load_any(tmp_path / "m")
    assert tm().INIT_DEVICES == ["meta"]
    assert not loaded.training and all(not t.is_meta for t in loaded.state_dict().values())
    same(loaded, model, torch.randn(3, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch.compile's
@pytest.mark.parametrize("wrapping", ["compile", "DataParallel", "compile(DataParallel)"])
def test_a_compiled_or_data_parallel_model_is_saved_as_the_module_it_wraps(wrapping: str, tmp_path: Path) -> None:
    """Their state dicts are the module's under a prefix, and a compiled graph is made anew in each process:
    the artifact holds the module, and loads as it (to be compiled or wrapped again)."""
    torch = require("torch")
    model = tm().MLP(4).eval()
    wrapped = {"compile": lambda: torch.compile(model), "DataParallel": lambda: torch.nn.DataParallel(model),
               "compile(DataParallel)": lambda: torch.compile(torch.nn.DataParallel(model))}[wrapping]()
    assert list(wrapped.state_dict()) != list(model.state_dict())  # a prefix: what loading it into MLP would miss
    x = torch.randn(3, 4)
    m = save_any(wrapped, tmp_path / "m", example=x)
    assert m.model_class == f"{tm().__name__}:MLP"
    loaded = load_any(tmp_path / "m", check=0.0)  # the stored example rerun on the module, bit for bit
    assert type(loaded) is tm().MLP and list(loaded.state_dict()) == list(model.state_dict())
    same(loaded, model, x)


def test_positional_keyword_and_default_arguments_are_captured(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().Captured((4, 6, 2), "tanh", dropout=0.1).eval()
    m = save_any(model, tmp_path / "m")
    assert m.info["init"] == {"init": {"sizes": {"__tuple__": [4, 6, 2]}, "activation": "tanh", "dropout": 0.1}}
    same(load_any(tmp_path / "m"), model, torch.randn(3, 4))


def test_a_dataclass_config_and_tied_embeddings_survive(tmp_path: Path) -> None:
    torch = require("torch")
    mods = tm()
    model = mods.ConfigNet(mods.Config(vocab=11, dim=6, blocks=[1, 2, 3]), {"scale": 0.5}).eval()
    m = save_any(model, tmp_path / "m")
    assert m.info["aliases"] == {"head.weight": "embed.weight"}
    loaded = load_any(tmp_path / "m")
    assert loaded.head.weight is loaded.embed.weight  # one Parameter again, not two copies
    assert loaded.config == model.config and torch.equal(loaded.transposed, model.transposed)
    same(loaded, model, torch.tensor([[1, 2, 3], [4, 5, 10]]))


def test_torch_containers_of_standard_layers_rebuild_without_any_help(tmp_path: Path) -> None:
    torch = require("torch")
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3, bias=False)).eval()
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert loaded[3].bias is None and isinstance(loaded[1], nn.LayerNorm)
    same(loaded, model, torch.randn(2, 4))
    nested = nn.Sequential(nn.ModuleDict({"enc": nn.Linear(3, 3)}), nn.ModuleList([nn.Conv1d(1, 2, 3)]))
    save_any(nested, tmp_path / "n")
    back = load_any(tmp_path / "n")
    assert isinstance(back[0]["enc"], nn.Linear) and isinstance(back[1][0], nn.Conv1d)
    for a, b in zip(nested.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")  # CPU torch
@pytest.mark.parametrize("layer", ["LSTM", "GRU", "RNN"])
def test_torch_recurrent_layers_rebuild_without_any_help(layer: str, tmp_path: Path) -> None:
    """Their __init__ is (*args, **kwargs): the arguments are read back by the names torch documents them by."""
    torch = require("torch")
    from torch import nn

    model = {"LSTM": lambda: nn.LSTM(4, 8, 2, batch_first=True, proj_size=3, dropout=0.25),
             "GRU": lambda: nn.GRU(4, 8, bidirectional=True, bias=False),
             "RNN": lambda: nn.RNN(4, 8, nonlinearity="relu")}[layer]().eval()
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model) and repr(loaded) == repr(model)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x), strict=True):
            for p, q in zip(*(t if isinstance(t, tuple) else (t,) for t in (a, b)), strict=True):
                assert torch.equal(p, q)
    save_any(nn.Sequential(model, nn.Identity()), tmp_path / "s")  # and as a container's child
    assert repr(load_any(tmp_path / "s")[0]) == repr(model)


def transformer(kind: str) -> Any:
    from torch import nn

    def enc(**kw: Any) -> Any:
        return nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, **kw)

    return {"encoder-layer": lambda: enc(activation="gelu", norm_first=True, layer_norm_eps=1e-6, dropout=0.2),
            "decoder-layer": lambda: nn.TransformerDecoderLayer(8, 4, 12, bias=False, batch_first=True),
            "encoder": lambda: nn.TransformerEncoder(enc(activation=nn.GELU(approximate="tanh")), 3,
                                                     norm=nn.LayerNorm(8), mask_check=False),
            "decoder": lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True), 2),
            "transformer": lambda: nn.Transformer(8, 2, 1, 2, 16, activation="gelu", batch_first=True),
            "in-sequential": lambda: nn.Sequential(nn.Linear(3, 8), enc(), nn.Linear(8, 1))}[kind]()


@pytest.mark.parametrize("kind", ["encoder-layer", "decoder-layer", "encoder", "decoder", "transformer",
                                  "in-sequential"])
def test_torch_transformers_rebuild_without_any_help(kind: str, tmp_path: Path) -> None:
    """Their arguments are not kept under their own names: they are read back from the layers they built,
    including what repr does not show (the activation, norm_first, the encoder's fast-path flags)."""
    torch = require("torch")
    torch.manual_seed(0)
    model = transformer(kind).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will need a template"
        save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert type(loaded) is type(model) and repr(loaded) == repr(model)
    plain = (int, float, bool, str, type(None))
    for (name, a), (_, b) in zip(model.named_modules(), loaded.named_modules(), strict=True):
        flags = {k: v for k, v in vars(a).items() if isinstance(v, plain) and k != "training"}
        assert flags == {k: v for k, v in vars(b).items() if isinstance(v, plain) and k != "training"}, name
        assert getattr(a, "activation", None).__class__ is getattr(b, "activation", None).__class__, name
        if callable(getattr(a, "activation", None)) and not isinstance(a.activation, torch.nn.Module):
            assert a.activation is b.activation, name
    for x, y in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    x = torch.randn(2, 5, 3 if kind == "in-sequential" else 8)
    args = (x, torch.randn(2, 4, 8)) if kind in ("decoder-layer", "decoder", "transformer") else (x,)
    with torch.no_grad():
        assert torch.equal(loaded(*args), model(*args))


def test_an_adaptive_softmax_rebuilds_without_any_help(tmp_path: Path) -> None:
    """AdaptiveLogSoftmaxWithLoss keeps `cutoffs` with n_classes appended: read back as it was given."""
    torch = require("torch")
    torch.manual_seed(0)
    model = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 50, [10, 30], div_value=2.0, head_bias=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will need a template"
        m = save_any(model, tmp_path / "m")
    assert m.info["init"]["init"]["cutoffs"] == [10, 30]
    loaded = load_any(tmp_path / "m")
    assert (loaded.cutoffs, loaded.div_value, loaded.head_bias) == ([10, 30, 50], 2.0, True)
    x, target = torch.randn(6, 16), torch.randint(0, 50, (6,))
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), model.log_prob(x))
        assert torch.equal(loaded(x, target).loss, model(x, target).loss)


def test_a_transformer_layer_with_a_plain_function_as_activation_needs_a_template(tmp_path: Path) -> None:
    """A function could be any code: it is not recorded, and loading asks for the layer."""
    torch = require("torch")
    model = torch.nn.TransformerEncoderLayer(8, 2, 16, activation=torch.tanh, batch_first=True).eval()
    with pytest.warns(UserWarning, match="will need a template"):
        save_any(model, tmp_path / "m")
    with pytest.raises(PersistError, match=r"model=TransformerEncoderLayer\(\.\.\.\)"):
        load_any(tmp_path / "m")
    template = torch.nn.TransformerEncoderLayer(8, 2, 16, activation=torch.tanh, batch_first=True)
    same(load_any(tmp_path / "m", model=template), model, torch.randn(2, 3, 8))


def test_parameter_containers_and_a_loss_with_class_weights_rebuild(tmp_path: Path) -> None:
    """Arguments that are the module's own tensors are recorded by shape and dtype; the values are the weights."""
    torch = require("torch")
    from torch import nn

    torch.manual_seed(0)
    plist = nn.ParameterList([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2).double())])
    pdict = nn.ParameterDict({"scale": nn.Parameter(torch.randn(4)), "shift": nn.Parameter(torch.randn(1))})
    loss = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0]), label_smoothing=0.1)
    for i, model in enumerate((plist, pdict, loss)):
        save_any(model, tmp_path / str(i))
        loaded = load_any(tmp_path / str(i))
        assert type(loaded) is type(model) and list(loaded.state_dict()) == list(model.state_dict())
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(load_any(tmp_path / "2")(logits, target), loss(logits, target))


def test_a_lazy_module_is_saved_once_it_has_seen_an_input(tmp_path: Path) -> None:
    torch = require("torch")
    from torch import nn

    model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.LazyLinear(1)).eval()
    with pytest.raises(UnsupportedModelError, match=r"0.weight, 0.bias, 2.weight\): .*run one forward pass"):
        save_any(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    x = torch.randn(2, 5)
    model(x)  # LazyLinear becomes Linear(5, 3)
    save_any(model, tmp_path / "m")
    same(load_any(tmp_path / "m"), model, x)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated in torch 2.13, still there
def test_a_quantized_model_says_what_to_save_instead(tmp_path: Path) -> None:
    """Dynamic quantization packs the weights into objects safetensors cannot hold; TorchScript can."""
    torch = require("torch")
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization too
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(UnsupportedModelError, match=r"'0\._packed_params\.dtype' as a dtype.*format='torchscript'"):
        save_any(quantized, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    save_any(quantized, tmp_path / "t", format="torchscript")
    same(load_any(tmp_path / "t", trusted=True), quantized, torch.randn(3, 4))


def test_module_and_tensor_arguments_of_a_users_class_are_recorded(tmp_path: Path) -> None:
    torch = require("torch")
    from torch import nn

    mods = tm()
    head = mods.Head(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)), n_out=3).eval()
    m = save_any(head, tmp_path / "head")
    assert m.info["init"]["init"]["backbone"]["__module__"]["class"] == "torch.nn.modules.container:Sequential"
    same(load_any(tmp_path / "head"), head, torch.randn(2, 4))
    weighted = mods.Weighted(torch.tensor([0.5, 2.0]), n_in=3).eval()
    m = save_any(weighted, tmp_path / "w")
    assert m.info["init"]["init"]["class_weight"] == {"__tensor__": {"key": "class_weight", "shape": [2],
                                                                     "dtype": "float32"}}
    same(load_any(tmp_path / "w"), weighted, torch.randn(2, 3))
    with pytest.warns(UserWarning, match="will need a template"):  # a tensor it does not keep: values unknown
        save_any(mods.Scaled(torch.ones(3)), tmp_path / "s")
    with pytest.warns(UserWarning, match="will need a template"):  # kept outside the state dict: values unknown
        save_any(mods.Unsaved(torch.tensor([2.0, 3.0])), tmp_path / "u")
    named = mods.Named().eval()  # `encoder="linear"` names the child it builds: the default is kept, not the child
    m = save_any(named, tmp_path / "n")
    assert m.info["init"] == {"init": {}}
    same(load_any(tmp_path / "n"), named, torch.randn(2, 3))


def test_pruned_weights_keep_their_masks(tmp_path: Path) -> None:
    """torch.nn.utils.prune keeps `weight_orig` and `weight_mask` and a hook that multiplies them: the rebuilt
    module (or a template) is masked again, so it loads, predicts the same, and can be pruned further."""
    torch = require("torch")
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = tm().MLP(4, hidden=8).eval()
    prune.l1_unstructured(model.l1, "weight", amount=0.5)
    prune.random_unstructured(model.l1, "weight", amount=0.25)  # a second pruning: torch's PruningContainer
    prune.l1_unstructured(model.l2, "bias", amount=1)
    m = save_any(model, tmp_path / "m")
    assert m.info["reapplied"] == [{"kind": "prune", "tensor": "l1.weight"}, {"kind": "prune", "tensor": "l2.bias"}]
    x = torch.randn(3, 4)
    for loaded in (load_any(tmp_path / "m"), load_any(tmp_path / "m", model=tm().MLP(4, hidden=8))):
        assert list(loaded.state_dict()) == list(model.state_dict())
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(loaded.l1.weight, model.l1.weight) and torch.equal(loaded.l2.bias, model.l2.bias)
        same(loaded, model, x)
        before = int((loaded.l1.weight == 0).sum())
        prune.l1_unstructured(loaded.l1, "weight", amount=4)  # pruning goes on from the saved mask
        assert int((loaded.l1.weight == 0).sum()) == before + 4
    seq = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    prune.random_unstructured(seq[0], "weight", amount=0.5)
    save_any(seq, tmp_path / "s")
    same(load_any(tmp_path / "s"), seq, x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(seq(x), tmp_path / "y.pt")
    # torch.nn.utils.prune is imported by the load that needs it, not by the adapter: a fresh process
    proc = run_python(f"""
        import sys, torch, mlpersist
        import mlpersist.adapters.torch
        assert "torch.nn.utils.prune" not in sys.modules
        loaded = mlpersist.load_any({str(tmp_path / "s")!r})
        from torch.nn.utils import prune
        assert prune.is_pruned(loaded)
        x, y = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "y.pt")!r})
        assert torch.equal(loaded(x), y)
        print("ok")
    """)
    assert proc.stdout.strip() == "ok", proc.stderr


def normed(kind: str) -> Any:
    torch = require("torch")
    from torch import nn
    from torch.nn.utils import parametrizations as para

    conv = nn.Conv1d(2, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        layer = {"weight_norm-hook": lambda: nn.utils.weight_norm(conv, dim=1),
                 "spectral_norm-hook": lambda: nn.utils.spectral_norm(conv, n_power_iterations=2),
                 "weight_norm": lambda: para.weight_norm(conv, "weight", dim=0),
                 "spectral_norm": lambda: para.spectral_norm(conv, eps=1e-10),
                 "both": lambda: para.spectral_norm(para.weight_norm(conv, "weight"), "bias")}[kind]()
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv1d(4, 1, 1))
    model.train()
    for _ in range(3):  # moves spectral norm's power-iteration vectors from where the constructor put them
        model(torch.randn(5, 2, 8))
    return model.eval()


@pytest.mark.parametrize("kind", ["weight_norm-hook", "spectral_norm-hook", "weight_norm", "spectral_norm", "both"])
def test_weight_and_spectral_norms_rebuild(kind: str, tmp_path: Path) -> None:
    """Both as hooks (torch.nn.utils) and as parametrizations, whose module is of a generated class
    (ParametrizedConv1d) that no import finds: applied again to the rebuilt layer, with the saved vectors."""
    torch = require("torch")
    torch.manual_seed(0)
    model = normed(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will need a template"
        m = save_any(model, tmp_path / "m")
    assert [e["tensor"] for e in m.info["reapplied"]] == ["0.weight", "0.bias"][:2 if kind == "both" else 1]
    for loaded in (load_any(tmp_path / "m"), load_any(tmp_path / "m", model=normed(kind))):
        assert repr(loaded) == repr(model) and list(loaded.state_dict()) == list(model.state_dict())
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        same(loaded, model, torch.randn(3, 2, 8))
        assert torch.equal(loaded[0].weight, model[0].weight)


@pytest.mark.parametrize("kind", ["matrix_exp", "cayley", "householder", "householder-wide", "no-trivialization"])
def test_orthogonal_parametrizations_rebuild(kind: str, tmp_path: Path) -> None:
    """orthogonal() keeps the map it chose and, by default, a `base` its right_inverse computes from values (which
    the meta device has not): recorded, applied again for real, the saved base and original loaded into it."""
    torch = require("torch")
    from torch.nn.utils import parametrizations as para

    torch.manual_seed(0)
    shape, options = {"matrix_exp": ((4, 4), {}), "cayley": ((4, 4), {"orthogonal_map": "cayley"}),
                      "householder": ((4, 4), {"orthogonal_map": "householder"}),
                      "householder-wide": ((6, 3), {}),  # not square: householder by default
                      "no-trivialization": ((5, 2), {"use_trivialization": False})}[kind]
    model = torch.nn.Sequential(para.orthogonal(torch.nn.Linear(*shape), **options), torch.nn.Tanh())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # moves the weight off what a fresh orthogonal() would give
        sgd.zero_grad()
        model(torch.randn(5, shape[0])).sum().backward()
        sgd.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "will need a template"
        m = save_any(model, tmp_path / "m")
    [entry] = m.info["reapplied"]
    if "householder" in kind:
        assert entry["steps"][0]["orthogonal"]["orthogonal_map"] == "householder"
    for loaded in (load_any(tmp_path / "m"), load_any(tmp_path / "m", model=torch.nn.Sequential(
            para.orthogonal(torch.nn.Linear(*shape), **options), torch.nn.Tanh()))):
        assert list(loaded.state_dict()) == list(model.state_dict())
        same(loaded, model, torch.randn(7, shape[0]))
        assert torch.equal(loaded[0].weight, model[0].weight)


def test_a_parametrization_mlpersist_does_not_record_needs_a_template(tmp_path: Path) -> None:
    torch = require("torch")
    from torch.nn.utils import parametrize

    model = torch.nn.Linear(4, 4).eval()
    parametrize.register_parametrization(model, "weight", tm().Symmetric())
    with pytest.warns(UserWarning, match="will need a template"):
        m = save_any(model, tmp_path / "m")
    assert m.info["class"] == "torch.nn.modules.linear:Linear"  # the class it was built as, not the generated one
    template = torch.nn.Linear(4, 4)
    parametrize.register_parametrization(template, "weight", tm().Symmetric())
    same(load_any(tmp_path / "m", model=template), model, torch.randn(2, 4))


def _chain(step: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "parametrizations", "tensor": "l1.weight", "steps": [step]}]


@pytest.mark.parametrize("pruned", ["not-a-list", "no-such-module", "no-such-parameter", "unknown-kind",
                                    "bad-argument", "unknown-step", "two-in-one-step", "bad-orthogonal-map",
                                    "orthogonal-trivialization-not-a-bool"])
def test_a_crafted_list_of_what_was_reapplied_is_a_corrupt_artifact(pruned: str, tmp_path: Path) -> None:
    save_any(tm().MLP(4), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    doc["info"]["reapplied"] = {
        "not-a-list": "l1.weight", "no-such-module": [{"kind": "prune", "tensor": "l9.weight"}],
        "no-such-parameter": [{"kind": "prune", "tensor": "l1.scale"}],
        "unknown-kind": [{"kind": "exec", "tensor": "l1.weight"}],
        "bad-argument": [{"kind": "weight_norm", "tensor": "l1.weight", "dim": "0"}],
        "unknown-step": _chain({"exec": {}}),
        "two-in-one-step": _chain({"weight_norm": {"dim": 0}, "spectral_norm": {}}),
        "bad-orthogonal-map": _chain({"orthogonal": {"orthogonal_map": "exec", "use_trivialization": True}}),
        "orthogonal-trivialization-not-a-bool": _chain({"orthogonal": {"orthogonal_map": "cayley",
                                                                        "use_trivialization": 1}})}[pruned]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptArtifactError, match=r"not a list|no such param|not what mlpersist records|as recorded"):
        load_any(tmp_path / "m")


def test_a_module_meta_cannot_finish_is_built_for_real_only_if_the_file_holds_its_size(tmp_path: Path) -> None:
    """orthogonal() cannot be applied on the meta device, so such a module is built for real. A manifest edited
    to a larger width (and to say meta cannot build it) must not get there: the module built on meta is held
    to the weights file's size first."""
    torch = require("torch")
    from torch.nn.utils import parametrizations as para

    model = tm().MLP(4, hidden=4).eval()
    para.orthogonal(model.l1)  # square: matrix_exp, whose right_inverse reads values (meta has none)
    save_any(model, tmp_path / "m")
    same(load_any(tmp_path / "m"), model, torch.randn(2, 4))  # the honest artifact: built for real
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    # still square (2**40 would fail to allocate; this one would be built)
    doc["info"]["init"]["init"].update(n_in=64, hidden=64)
    doc["info"]["meta_ok"] = False
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptArtifactError, match="holds more numbers than its weights file"):
        load_any(tmp_path / "m")


def test_explicit_init_kwargs_are_used(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().WithCache(5).eval()
    save_any(model, tmp_path / "m", init_kwargs={"n": 5})
    loaded = load_any(tmp_path / "m")
    assert torch.equal(loaded.cache, model.cache)  # the non-persistent buffer: rebuilt for real, not left on meta
    same(loaded, model, torch.randn(2, 5))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_half_precision_and_other_dtypes_round_trip_bit_for_bit(dtype: str, tmp_path: Path) -> None:
    torch = require("torch")
    dt = getattr(torch, dtype)
    model = tm().Captured((4, 3), dtype=dt).eval()
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert loaded.body[0].weight.dtype == dt
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    same(loaded, model, torch.randn(2, 4, dtype=dt))


@pytest.mark.parametrize("extra", [None, "complex64"], ids=["direct", "through-save_file"])
def test_weights_are_standard_safetensors_aligned_and_equal_to_save_file(extra: str | None, tmp_path: Path) -> None:
    torch = require("torch")
    from safetensors.torch import load_file, save_file

    from mlpersist.adapters._safetensors import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dt}": (torch.randn(3, 5, generator=g) * 50).to(getattr(torch, dt))
               for dt in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                          "bool", "float8_e4m3fn")}
    tensors |= {"odd": torch.arange(7, dtype=torch.uint8), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
                "view": torch.arange(40.0)[10:30].reshape(4, 5)}  # a contiguous view with a storage offset
    if extra:
        tensors["c"] = torch.randn(4, dtype=getattr(torch, extra), generator=g)
    write_safetensors(tensors, tmp_path / "ours.safetensors")
    save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert set(ours) == set(tensors) == set(theirs)
    def raw(t: Any) -> Any:  # bit for bit, whatever the dtype (float8 has no equality)
        return t.reshape(-1).view(torch.uint8)

    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        assert torch.equal(raw(ours[name]), raw(t)) and torch.equal(raw(ours[name]), raw(theirs[name])), name
    data = (tmp_path / "ours.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % 8 == 0
    for name, entry in json.loads(data[8:8 + n]).items():
        assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    # mlpersist's reader: views of the checked bytes, equal to safetensors' own reading of both files
    from mlpersist.adapters._safetensors import read_safetensors

    for which, theirs_read in (("ours", ours), ("theirs", theirs)):
        buf = bytearray((tmp_path / f"{which}.safetensors").read_bytes())
        mine = read_safetensors(buf, which)
        if extra:  # complex64: not a dtype it views; the adapter has safetensors read it instead
            assert mine is None
            continue
        assert mine is not None and set(mine) == set(theirs_read)
        start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
        for name, t in mine.items():
            assert t.dtype == theirs_read[name].dtype and t.shape == theirs_read[name].shape, name
            assert torch.equal(raw(t), raw(theirs_read[name])), name
            assert not t.numel() or start <= t.data_ptr() < start + len(buf), name  # a view, not a copy


def _st(header: Any, data: bytes = b"", length: int | None = None) -> bytearray:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return bytearray((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


F4 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def test_a_saved_torch_model_above_a_piece_records_the_digest_of_its_file(tmp_path: Path) -> None:
    """The weights are hashed as they are written (`_writeback`): the digest is still that of the file."""
    torch = require("torch")
    from blake3 import blake3

    from mlpersist import _writeback

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.Linear(2048, 4096))  # 42 MB
    assert sum(p.numel() for p in net.parameters()) * 4 > 2 * _writeback.PIECE
    m = save_any(net, tmp_path / "a")
    for name, entry in m.files.items():
        assert entry.digest == "blake3:" + blake3((tmp_path / "a" / name).read_bytes()).hexdigest(), name
    verify(tmp_path / "a")
    x = torch.randn(4, 1024)
    assert torch.equal(load_any(tmp_path / "a")(x), net.eval()(x))


@pytest.mark.parametrize("buf", [
    bytearray(b"\x01\x00"),                                               # shorter than the length field
    _st({"a": F4}, bytes(8), length=10**9),                              # a header longer than the file
    _st(b"{not json", bytes(8)),
    _st(b'{"a": ' + json.dumps(F4).encode() + b', "a": ' + json.dumps(F4).encode() + b"}", bytes(8)),  # twice
    _st([1, 2], bytes(8)),                                               # not an object
    _st({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    _st({"a": {**F4, "shape": [-2]}}, bytes(8)),
    _st({"a": {**F4, "shape": [2.0]}}, bytes(8)),
    _st({"a": {**F4, "data_offsets": [0, 16]}}, bytes(8)),                # past the end of the data
    _st({"a": {**F4, "data_offsets": [0, 4]}}, bytes(8)),                 # smaller than its shape
    _st({"a": F4, "b": F4}, bytes(8)),                                   # two tensors on the same bytes
    _st({"a": {**F4, "data_offsets": [8, 16]}}, bytes(16)),               # a gap before the first
    _st({"a": F4}, bytes(12)),                                           # bytes after the last
    _st({"a": F4, "__metadata__": [1]}, bytes(8)),
], ids=["short", "long-header", "not-json", "duplicate", "array", "dtype-type", "negative-shape", "float-shape",
        "past-end", "too-small", "overlap", "gap", "trailing", "metadata"])
def test_malformed_safetensors_headers_are_corrupt_artifacts(buf: bytearray) -> None:
    require("torch")
    from mlpersist.adapters._safetensors import read_safetensors
    from mlpersist.errors import CorruptArtifactError

    with pytest.raises(CorruptArtifactError, match="not valid safetensors"):
        read_safetensors(buf, "weights.safetensors")


@pytest.mark.parametrize("large", [False, True], ids=["read-into-memory", "private-mapping"])
def test_weights_rewritten_in_place_during_or_after_the_load_do_not_change_the_model(
        large: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors view the bytes that were hashed, not the file: a writer racing the check, or writing
    while the model is in use, changes the file only (safetensors' own loader maps the file, whose
    pages would follow such a write). `large`: the path of files of 16 MiB or more (a private mapping
    copied in whole), taken here by lowering the threshold."""
    torch = require("torch")
    from mlpersist import _digest, _reading

    if large:
        monkeypatch.setattr(_digest, "MAP_BYTES", 512)

    torch.manual_seed(0)
    model = tm().MLP(4, hidden=8).eval()
    save_any(model, tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    n = int.from_bytes(weights.read_bytes()[:8], "little")
    real = _reading.hash_file

    def zero_data(path: Path) -> None:
        with open(path, "r+b") as w:  # in place: the same inode, same size
            w.seek(8 + n)
            w.write(bytes(path.stat().st_size - 8 - n))

    def check_then_rewrite(f: Any, size: int, algo: str | None = None, **kw: Any) -> Any:
        out = real(f, size, algo, **kw)
        if size == weights.stat().st_size and kw.get("whole"):
            zero_data(weights)  # right after the check, before torch reads a byte
        return out

    monkeypatch.setattr(_reading, "hash_file", check_then_rewrite)
    loaded = load_any(tmp_path / "m")
    monkeypatch.setattr(_reading, "hash_file", real)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert not any(weights.read_bytes()[8 + n:])  # the file was zeroed meanwhile
    save_any(model, tmp_path / "m2")
    again = load_any(tmp_path / "m2")
    w2 = tmp_path / "m2" / "weights.safetensors"
    w2.write_bytes(bytes(w2.stat().st_size))  # while the model is in use: truncated and rewritten (same inode)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_requires_grad_is_kept_and_the_model_comes_back_in_eval_mode(tmp_path: Path) -> None:
    model = tm().MLP(4)
    model.l1.weight.requires_grad_(False)
    save_any(model, tmp_path / "m")
    loaded = load_any(tmp_path / "m")
    assert not loaded.l1.weight.requires_grad and loaded.l2.weight.requires_grad and not loaded.training


def test_loading_into_a_given_instance_and_onto_a_device(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().MLP(4).eval()
    save_any(model, tmp_path / "m")
    target = tm().MLP(4)
    assert load_any(tmp_path / "m", model=target) is target
    same(target, model, torch.randn(3, 4))
    on_cpu = load_any(tmp_path / "m", device=torch.device("cpu"))
    assert on_cpu.l1.weight.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(PersistError, match="cannot place the weights on cuda:0"):
            load_any(tmp_path / "m", device="cuda:0")


def test_an_unrecordable_constructor_warns_once_and_loading_asks_for_a_template(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().Opaque(torch.nn.Linear(3, 2)).eval()
    with pytest.warns(UserWarning, match="will need a template") as record:
        save_any(model, tmp_path / "a")
        save_any(model, tmp_path / "b")
    assert len([w for w in record if "template" in str(w.message)]) == 1
    with pytest.raises(PersistError, match=r"load_any\(path, model=Opaque\(\.\.\.\)\)"):
        load_any(tmp_path / "a")
    same(load_any(tmp_path / "a", model=tm().Opaque(torch.nn.Linear(3, 2))), model, torch.randn(2, 3))


def test_a_class_not_importable_at_load_time_says_how_to_give_a_template(tmp_path: Path) -> None:
    save_any(tm().MLP(4), tmp_path / "m")
    proc = run_python(f"""
        import mlpersist
        try:
            mlpersist.load_any({str(tmp_path / 'm')!r})
        except mlpersist.PersistError as exc:
            print(type(exc).__name__, exc)
    """, env={"PYTHONPATH": str(Path(__file__).parents[1])})  # tests/, without tests/adapters/torch_models.py
    assert "not importable here" in proc.stdout and "model=MLP(...)" in proc.stdout


@pytest.mark.parametrize("where", ["class", "argument"])
@pytest.mark.parametrize("cls", ["torch_models:NotAModule", "os:system", "builtins:eval", "collections:OrderedDict",
                                 "antigravity:X", "torch_models:Config"])
def test_a_class_that_is_not_a_module_is_refused_before_anything_is_built(cls: str, where: str,
                                                                          tmp_path: Path) -> None:
    """The model's class, or a module recorded among its constructor arguments."""
    save_any(tm().MLP(4), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    if where == "class":
        doc["info"]["class"] = cls
    else:
        doc["info"]["init"]["init"]["n_out"] = {"__module__": {"class": cls, "init": {}}}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(UntrustedContentError, match="refusing"):
        load_any(tmp_path / "m")
    assert tm().NotAModule.built == []


def test_optimizer_state_and_extra_resume_training_identically(tmp_path: Path) -> None:
    torch = require("torch")
    torch.manual_seed(0)
    model = tm().Captured((4, 8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    save_any(model, tmp_path / "ckpt", optimizer=opt, extra={"epoch": 3})
    loaded, state = load_any(tmp_path / "ckpt", training_state=True)
    assert state["extra"] == {"epoch": 3}
    opt2 = torch.optim.Adam(loaded.parameters(), lr=0.5)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 0.01
    for m, o in ((model, opt), (loaded, opt2)):
        m.train()
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["class-changed", "huge", "template", "renamed-weight", "bare-into-template"])
def test_weights_that_do_not_fit_the_module_are_a_typed_error(case: str, tmp_path: Path) -> None:
    """The class changed since the save, a template of another shape, or a weight renamed in a (crafted) file:
    torch's RuntimeError becomes a CorruptArtifactError that names the weights and says what to do. A crafted
    width of 2**40 (16 TiB of weights) is found not to fit on the meta device, before anything is allocated."""
    torch = require("torch")
    save_any(tm().MLP(4), tmp_path / "m")
    options: dict[str, Any] = {}
    path = tmp_path / "m"
    if case in ("class-changed", "huge"):  # as if MLP's default width had changed: rebuilt with 8 hidden units
        doc = json.loads((path / "manifest.json").read_text())
        doc["info"]["init"]["init"]["hidden"] = 8 if case == "class-changed" else 2**40
        doc["info"]["meta_ok"] = case == "class-changed"  # "huge": as if the class could only be built for real
        (path / "manifest.json").write_text(json.dumps(doc))
    elif case == "template":
        options["model"] = tm().MLP(5)
    elif case == "renamed-weight":
        raw = (path / "weights.safetensors").read_bytes().replace(b'"l1.weight"', b'"l1.weigxt"')
        (path / "weights.safetensors").write_bytes(raw)
        doc = json.loads((path / "manifest.json").read_text())
        doc["files"]["weights.safetensors"] = {"size": len(raw), "digest": "sha256:" + sha256(raw).hexdigest()}
        (path / "manifest.json").write_text(json.dumps(doc))
    else:
        torch.save(tm().MLP(4).state_dict(), tmp_path / "weights.pth")
        path, options["model"] = tmp_path / "weights.pth", tm().MLP(5)
    with pytest.raises(CorruptArtifactError, match=r"do not fit MLP as it is defined now .*(mismatch|Missing key)"):
        load_any(path, **options)


@pytest.mark.parametrize("kind", ["Stack", "Stubborn", "TransformerEncoder"])
def test_a_count_in_the_manifest_builds_no_more_than_the_weights_file_holds(kind: str, tmp_path: Path) -> None:
    """A constructor's loop runs as many times as the manifest says: 20,000 layers of a small encoder took 35 s
    and 0.9 GB to build on meta (a million would take the machine's memory) before the weights were compared."""
    torch = require("torch")
    from torch.nn.modules import module as torch_module

    if kind == "TransformerEncoder":
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        model, count = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), "num_layers"
        match = "recorded with num_layers=10000000, more layers than its weights file holds tensors"
    else:
        model, count, match = getattr(tm(), kind)(4, 3), "depth", f"{kind} as recorded registers more than 4120 "
    model.eval()
    save_any(model, tmp_path / "m")
    x = torch.randn(2, 3, 8) if kind == "TransformerEncoder" else torch.randn(2, 4)
    hooks = [len(h) for h in (torch_module._global_module_registration_hooks,
                              torch_module._global_parameter_registration_hooks)]
    assert torch.equal(load_any(tmp_path / "m")(x), model(x))
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    doc["info"]["init"]["init"][count] = 10**7
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptArtifactError, match=match):
        load_any(tmp_path / "m")
    assert hooks == [len(h) for h in (torch_module._global_module_registration_hooks,
                                      torch_module._global_parameter_registration_hooks)]  # none left behind


@pytest.mark.parametrize("case", ["negative-shape", "unknown-dtype", "no-such-weight", "module-in-optimizer",
                                  "tensor-in-optimizer"])
def test_modules_and_tensors_are_built_only_as_constructor_arguments(case: str, tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().Weighted(torch.tensor([0.5, 2.0]))
    save_any(model, tmp_path / "m", optimizer=torch.optim.SGD(model.parameters(), lr=0.1), extra={"epoch": 1})
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    init, info = doc["info"]["init"]["init"], doc["info"]
    if case == "negative-shape":
        init["class_weight"]["__tensor__"]["shape"] = [-2]
    elif case == "unknown-dtype":
        init["class_weight"]["__tensor__"]["dtype"] = "system"
    elif case == "no-such-weight":
        init["class_weight"]["__tensor__"]["key"] = "lin.weight"  # there, but of another shape
    elif case == "module-in-optimizer":
        info["optimizer"]["param_groups"][0]["lr"] = {"__module__": {"class": "torch.nn:Linear"}}
    else:
        info["optimizer"]["scalars"] = {"0": {"step": {"__tensor__": {"shape": [2**40], "dtype": "float32"}}}}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CorruptArtifactError, match=r"not a list of sizes|unknown torch dtype|outside constructor|"
                                                   r"which the weights file does not hold"):
        load_any(tmp_path / "m", training_state=True)


@pytest.mark.parametrize("saved_with", ["these versions", "another torch"])
def test_a_constructor_that_refuses_the_recorded_arguments_is_a_typed_error(saved_with: str, tmp_path: Path) -> None:
    """As when a torch class gained an argument (TransformerEncoderLayer's bias=, in 2.1) and an older torch
    loads the model: the class's TypeError was raised as it was. A CorruptArtifactError saying what to do; a
    VersionMismatchError with the pip line when the manifest's torch differs from this one."""
    save_any(tm().MLP(4), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "manifest.json").read_text())
    doc["info"]["init"]["init"]["bias_new"] = True
    if saved_with == "another torch":
        doc["environment"]["packages"]["torch"] = "2.99.0"
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(doc))
    expected = VersionMismatchError if saved_with == "another torch" else CorruptArtifactError
    with pytest.raises(expected, match=r"MLP could not be built from the arguments recorded .*unexpected keyword "
                                       r"argument 'bias_new'.*model=MLP\(\.\.\.\)") as info:
        load_any(tmp_path / "m")
    assert (saved_with == "another torch") == ("pip install 'torch==2.99.0'" in str(info.value))


def test_a_bare_state_dict_file_loads_safely_as_dict_or_into_a_model(tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().MLP(4).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    state = load_any(tmp_path / "weights.pth")
    assert state.keys() == model.state_dict().keys()
    same(load_any(tmp_path / "weights.pth", model=tm().MLP(4)), model, torch.randn(2, 4))
    assert inspect(tmp_path / "weights.pth").adapter == "torch"


def test_a_bare_safetensors_file_loads_by_content(tmp_path: Path) -> None:
    torch = require("torch")
    from safetensors.torch import save_file

    model = tm().MLP(4).eval()
    save_file(model.state_dict(), tmp_path / "weights.bin")  # the suffix says nothing: the header does
    assert load_any(tmp_path / "weights.bin").keys() == model.state_dict().keys()
    same(load_any(tmp_path / "weights.bin", model=tm().MLP(4)), model, torch.randn(2, 4))


def test_a_legacy_format_torch_file_loads_as_a_state_dict(tmp_path: Path) -> None:
    """torch.save's pre-1.6 format is a run of pickles, the first a magic number (joblib's reader would
    return that number as the model)."""
    torch = require("torch")
    model = tm().MLP(4).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert inspect(path).adapter == "torch"
    state = load_any(path)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    same(load_any(path, model=tm().MLP(4)), model, torch.randn(2, 4))
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()  # the storage's element count, 8 bytes before its 4 float32 values, made 5 Gi
    n = 4
    assert int.from_bytes(raw[-8 - 4 * n:-4 * n], "little") == n
    path.write_bytes(raw[:-8 - 4 * n] + (5 << 30).to_bytes(8, "little") + raw[-4 * n:])
    with pytest.raises(CorruptArtifactError, match="could not be read"):
        load_any(path)


def _inflating_archive(torch: Any, tmp_path: Path, kind: str) -> Path:
    """A torch.save archive torch.load reads, which makes it hold far more than its size: its records
    deflated (40 zero tensors of 4 MiB), or 40 central-directory entries pointing at one stored record."""
    import struct
    import zipfile

    honest = tmp_path / "honest.pt"
    torch.save({f"t{i}": torch.zeros(1 << 20) for i in range(40)}, honest)
    raw = honest.read_bytes()
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(honest) as zin:
        infos = zin.infolist()
        if kind == "deflated":
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
                for info in infos:
                    zout.writestr(info.filename, zin.read(info))
            return path
    shared = next(i for i in infos if i.filename.endswith("/data/0"))
    out, offsets = bytearray(), {}
    for info in infos:
        if "/data/" in info.filename and info is not shared:
            continue  # the other records' bytes are dropped: their entries point at record 0
        start = info.header_offset
        name_len, extra_len = struct.unpack("<HH", raw[start + 26:start + 30])
        offsets[info.filename] = len(out)
        out += raw[start:start + 30 + name_len + extra_len + info.compress_size]
    directory = bytearray()
    for info in infos:
        name = info.filename.encode()
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0x21, info.CRC,
                                 info.compress_size, info.file_size, len(name), 0, 0, 0, 0, 0,
                                 offsets.get(info.filename, offsets[shared.filename])) + name
    at = len(out)
    out += directory + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(infos), len(infos), len(directory), at, 0)
    path.write_bytes(out)
    return path


@pytest.mark.parametrize("kind", ["deflated", "overlapping"])
def test_a_torch_archive_that_would_make_torch_read_more_than_it_holds_is_refused(kind: str, tmp_path: Path) -> None:
    torch = require("torch")
    path = _inflating_archive(torch, tmp_path, kind)
    state = torch.load(path, weights_only=True)  # torch itself takes it: 160 MiB out of a few MB
    assert sum(t.nbytes for t in state.values()) == 40 << 22 > 20 * path.stat().st_size
    del state
    match = "is compressed" if kind == "deflated" else "members overlap"
    for trusted in (False, True):
        with pytest.raises(CorruptArtifactError, match=match):
            load_any(path, trusted=trusted)


class _Gadget:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return open, (self.path, "w")


def test_a_bare_torch_file_with_a_pickle_gadget_is_refused(tmp_path: Path) -> None:
    torch = require("torch")
    sentinel = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(2), "x": _Gadget(str(sentinel))}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedContentError, match="weights_only"):
        load_any(tmp_path / "evil.pt")
    assert not sentinel.exists()
    assert pickle  # the gadget pickles through torch.save's own pickler


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_program_formats_need_trust_and_load_without_the_source(fmt: str, tmp_path: Path) -> None:
    torch = require("torch")
    model = tm().MLP(4).eval()
    x = torch.randn(3, 4)
    save_any(model, tmp_path / "m", format=fmt, example=(x,))
    with pytest.raises(UntrustedContentError, match="is a program"):
        load_any(tmp_path / "m")
    same(load_any(tmp_path / "m", trusted=True), model, x)
    torch.save(x, tmp_path / "x.pt")
    proc = run_python(f"""
        import torch, mlpersist, sys
        assert "torch_models" not in sys.modules
        m = mlpersist.load_any({str(tmp_path / 'm')!r}, trusted=True)
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        print(m(x).sum().item())
    """, env={"PYTHONPATH": str(Path(__file__).parents[1])})
    with torch.no_grad():
        assert float(proc.stdout) == pytest.approx(model(x).sum().item(), rel=1e-6)


def test_mmap_true_maps_large_weights_and_the_model_then_follows_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented trade of `load_any(mmap=True)`: no copy, and a write to the file reaches the model."""
    torch = require("torch")
    from mlpersist import _digest

    monkeypatch.setattr(_digest, "MAP_BYTES", 512)  # these weights count as large (the 16 MiB rule)
    torch.manual_seed(0)
    model = tm().MLP(4, hidden=8).eval()
    save_any(model, tmp_path / "m")
    mapped, copied = load_any(tmp_path / "m", mmap=True), load_any(tmp_path / "m")
    for loaded in (mapped, copied):
        for name, t in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], t), name
    weights = tmp_path / "m" / "weights.safetensors"
    n = int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as w:  # in place, no truncation
        w.seek(8 + n)
        w.write(bytes(weights.stat().st_size - 8 - n))
    assert not mapped.l1.weight.any()  # mapped: the weights followed the file
    assert torch.equal(copied.l1.weight, model.l1.weight)  # the default: its own copy


def test_inspecting_a_bare_safetensors_file_imports_no_framework(tmp_path: Path) -> None:
    torch = require("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, tmp_path / "w.safetensors")
    out = run_python(f"""
        import sys, mlpersist
        print(mlpersist.inspect({str(tmp_path / 'w.safetensors')!r}).adapter, "torch" in sys.modules)
    """)
    assert out.stdout.split() == ["torch", "False"], out.stdout + out.stderr
