"""manualbp.convert on real models built from configs (random init, nothing downloaded).

Hugging Face BERT, RoBERTa and GPT-2 and a timm ViT, tiny, in float64: every linear-like module
converted (GPT-2's Conv1D too), the activation fused in every MLP block, the same Parameters and
state_dict keys, and the loss and every gradient equal to the native model's — eagerly and under
`torch.compile(fullgraph=True)`. Also each library activation class the converter maps, checked
numerically against the library's own module (f and f′), and the cases it must leave unfused.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch._inductor.compile_fx import compile_fx

#: Where `make setup` puts torchvision's Python part (outside site-packages: see the Makefile).
TORCHVISION_DIR = Path(sys.prefix) / "torchvision-python"


def _import_torchvision() -> None:
    """Make `import torchvision` (which timm does at import) work here, and only here.

    The torchvision wheel that matches torch 2.13 is a CUDA build; on the CPU build of torch its
    C++ ops cannot load, and its import then fails registering fake kernels for them
    (`torchvision::nms does not exist`). Those registrations only serve tracing of its detection
    ops, which nothing here uses: skip them. Where torchvision works, nothing changes.
    """
    if importlib.util.find_spec("torchvision") is None:
        if not TORCHVISION_DIR.is_dir():
            raise ModuleNotFoundError(
                f"torchvision: not installed, nor in {TORCHVISION_DIR}; expected `make setup` to put "
                "it there (timm imports it)"
            )
        sys.path.append(str(TORCHVISION_DIR))
    try:
        import torchvision  # noqa: F401
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


_import_torchvision()

import timm  # noqa: E402
import timm.layers.activations as timm_act  # noqa: E402
import transformers  # noqa: E402
import transformers.activations as hf_act  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import manualbp as mbp  # noqa: E402
from manualbp.convert import convert, revert  # noqa: E402
from manualbp.nn import TransposedLinear  # noqa: E402

from .helpers import TOL, rel_err  # noqa: E402

F64 = torch.float64
TIGHT = TOL[F64]

# ------------------------------------------------------------------------------------ models


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForPreTraining(config).to(F64)  # encoder, pooler and MLM head


def _roberta() -> nn.Module:
    config = transformers.RobertaConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=1,
    )
    return transformers.RobertaModel(config).to(F64)  # with its pooler


def _gpt2(activation: str = "gelu_new") -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=40,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function=activation,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).to(F64)


def _vit() -> nn.Module:
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        depth=2,
        embed_dim=16,
        num_heads=2,
        num_classes=5,
    )
    return model.to(F64)


def _tokens(n: int = 6) -> Tensor:
    return torch.randint(2, 40, (2, n))


def _bert_loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids, next_sentence_label=torch.tensor([0, 1])).loss


def _roberta_loss(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids)
    weights = torch.linspace(-1, 1, out.last_hidden_state.numel(), dtype=F64)
    return (out.last_hidden_state.flatten() * weights).sum() + out.pooler_output.square().sum()


def _gpt2_loss(model: nn.Module, ids: Tensor) -> Tensor:
    # Next-token cross entropy, by hand: GPT-2's own loss upcasts the logits to float32.
    logits = model(input_ids=ids).logits
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _vit_loss(model: nn.Module, images: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(images), torch.tensor([1, 3]))


LossFn = Callable[[nn.Module, Tensor], Tensor]
CASES: dict[str, tuple[Callable[[], nn.Module], LossFn, Callable[[], Tensor]]] = {
    "bert": (_bert, _bert_loss, _tokens),
    "roberta": (_roberta, _roberta_loss, _tokens),
    "gpt2": (_gpt2, _gpt2_loss, _tokens),
    "vit": (_vit, _vit_loss, lambda: torch.randn(2, 3, 16, 16, dtype=F64)),
}

# Where each model's MLP blocks are, and what their projection must become.
MLP_BLOCKS = {
    "bert": ("BertIntermediate", "dense", "intermediate_act_fn", "manualbp.LinearAct(gelu)"),
    "roberta": ("RobertaIntermediate", "dense", "intermediate_act_fn", "manualbp.LinearAct(gelu)"),
    "gpt2": ("GPT2MLP", "c_fc", "act", "manualbp.nn.TransposedLinear(gelu_tanh)"),
    "vit": ("Mlp", "fc1", "act", "manualbp.LinearAct(gelu)"),
}


def _loss_and_grads(model: nn.Module, loss_fn, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    loss = loss_fn(model, batch)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(names, grads, strict=True) if g is not None}


def _assert_same(ours: tuple[Tensor, dict[str, Tensor]], native: tuple[Tensor, dict[str, Tensor]]) -> None:
    assert ours[0].dtype == F64 and rel_err(ours[0], native[0]) <= TIGHT
    assert ours[1].keys() == native[1].keys() and len(native[1]) > 10
    # A gradient that is zero in exact arithmetic (attention's key bias: softmax ignores a shift)
    # is rounding noise in both, where a relative error means nothing: both must be that small.
    noise = 1e-12 * max(float(g.norm()) for g in native[1].values())
    for name, grad in native[1].items():
        if float(grad.norm()) <= noise:
            assert float(ours[1][name].norm()) <= noise, name
        else:
            assert rel_err(ours[1][name], grad) <= TIGHT, name


def _linear_like(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, TransposedLinear))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_model_converts_fuses_and_matches_native(case: str) -> None:
    build, loss_fn, make_batch = CASES[case]
    model = build()
    native = copy.deepcopy(model)
    batch = make_batch()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    linears = _linear_like(model)
    originals = {n: m for n, m in model.named_modules()}

    report = convert(model)

    # Every linear-like module converted, nothing left native (nor silently: skipped is empty).
    assert report.skipped == [] and report.unfused == [] and sorted(report.names) == sorted(linears)
    assert not any(type(m) in (nn.Linear, Conv1D) for m in model.modules())
    # The activation fused in every MLP block, its slot an nn.Identity now.
    block_type, proj, slot, fused = MLP_BLOCKS[case]
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ == block_type]
    assert len(blocks) == 2
    for name, block in blocks:
        assert type(getattr(block, slot)) is nn.Identity
        replacement = report.replaced[report.names.index(f"{name}.{proj}")]
        assert (replacement.new, replacement.activation) == (fused, f"{name}.{slot}")
    # The very same Parameters under the same names; the same state_dict keys.
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    if case == "gpt2":  # the tied head still shares the embedding's Parameter
        assert model.lm_head.weight is model.transformer.wte.weight
        assert all(type(m) is TransposedLinear for m in model.modules() if hasattr(m, "nf"))

    expected = _loss_and_grads(native, loss_fn, batch)
    _assert_same(_loss_and_grads(model, loss_fn, batch), expected)

    back = revert(model)
    assert sorted(back.names) == sorted(linears) and back.skipped == []
    for name, module in model.named_modules():  # native types again; activations the very same
        assert type(module) is type(originals[name]), name
        if type(module) not in (nn.Linear, Conv1D):
            assert module is originals[name], name
    assert all(p is params[n] for n, p in model.named_parameters())
    _assert_same(_loss_and_grads(model, loss_fn, batch), expected)


def test_bert_pooler_and_prediction_head_are_fused() -> None:
    model = _bert()
    report = convert(model)
    fused = {r.name: r.new for r in report.fused}
    assert fused["bert.pooler.dense"] == "manualbp.LinearAct(tanh)"
    assert fused["cls.predictions.transform.dense"] == "manualbp.LinearAct(gelu)"
    assert len(fused) == 2 + 2 and report.unfused == []


@pytest.mark.parametrize("case", ["bert", "gpt2", "vit"])
def test_real_model_under_compile_fullgraph(case: str) -> None:
    torch._dynamo.reset()
    build, loss_fn, make_batch = CASES[case]
    model = build()
    native = copy.deepcopy(model)
    batch = make_batch()
    report = convert(model)
    captured: list[str] = []

    def inductor(graph: torch.fx.GraphModule, inputs: list[Tensor]):
        # Inductor itself, after noting which ops the captured graph calls.
        captured.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return compile_fx(graph, inputs)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=inductor)  # fails on any graph break
    _assert_same(_loss_and_grads(model, compiled, batch), _loss_and_grads(native, loss_fn, batch))
    # Every converted layer ran as a manualbp op in the graph (its backward is manualbp's).
    assert sum("manualbp.linear_forward" in target for target in captured) == len(report)


# ------------------------------------------------------------------------------------ activations

# Library activation modules and the registry entry each must map to (float64 checks below).
FUSED = [
    ("hf GELUActivation", lambda: hf_act.GELUActivation(), "gelu"),
    ("hf GELUActivation(use_gelu_python)", lambda: hf_act.GELUActivation(use_gelu_python=True), "gelu"),
    ("hf NewGELUActivation", lambda: hf_act.NewGELUActivation(), "gelu_tanh"),
    ("hf GELUTanh", lambda: hf_act.GELUTanh(), "gelu_tanh"),
    ("hf GELUTanh(python)", lambda: hf_act.GELUTanh(use_gelu_tanh_python=True), "gelu_tanh"),
    ("hf AccurateGELUActivation", lambda: hf_act.AccurateGELUActivation(), "gelu_tanh"),
    ("hf SiLUActivation", lambda: hf_act.SiLUActivation(), "silu"),
    ("hf MishActivation", lambda: hf_act.MishActivation(), "mish"),
    ("hf ACT2FN[relu]", lambda: hf_act.ACT2FN["relu"], "relu"),
    ("hf ACT2FN[swish]", lambda: hf_act.ACT2FN["swish"], "silu"),
    ("hf ACT2FN[tanh]", lambda: hf_act.ACT2FN["tanh"], "tanh"),
    ("hf ACT2FN[sigmoid]", lambda: hf_act.ACT2FN["sigmoid"], "sigmoid"),
    ("hf ACT2FN[leaky_relu]", lambda: hf_act.ACT2FN["leaky_relu"], "leaky_relu"),
    ("timm GELU", lambda: timm_act.GELU(), "gelu"),
    ("timm GELUTanh", lambda: timm_act.GELUTanh(), "gelu_tanh"),
    ("timm Swish", lambda: timm_act.Swish(), "silu"),
    ("timm Sigmoid(inplace)", lambda: timm_act.Sigmoid(inplace=True), "sigmoid"),
    ("timm Tanh", lambda: timm_act.Tanh(), "tanh"),
    ("timm Mish", lambda: timm_act.Mish(), "mish"),
    ("timm get_act_layer(gelu)", lambda: timm.layers.get_act_layer("gelu")(), "gelu"),
]


@pytest.mark.parametrize(("label", "make", "expected"), FUSED, ids=[case[0] for case in FUSED])
def test_library_activation_fuses_to_the_exact_registry_entry(label: str, make, expected: str) -> None:
    act = make()
    model = nn.Sequential(nn.Linear(5, 7), act).to(F64)
    z = torch.linspace(-6, 6, 97, dtype=F64, requires_grad=True)
    # The library's own module, in float64: f and f′ (by autograd through its forward).
    ref = act(z.clone())
    (ref_grad,) = torch.autograd.grad(ref.sum(), z)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    before = model(x)
    before_grads = torch.autograd.grad(before.square().sum(), [x, *model.parameters()])

    report = convert(model)

    assert [r.new for r in report.fused] == [f"manualbp.LinearAct({expected})"], label
    entry = model[0].act
    assert rel_err(entry(z.detach()), ref) <= TIGHT
    saved = entry(z.detach()) if entry.uses_output else z.detach()
    assert rel_err(entry.derivative(saved), ref_grad) <= TIGHT
    after = model(x)
    assert rel_err(after, before) <= TIGHT
    after_grads = torch.autograd.grad(after.square().sum(), [x, *model.parameters()])
    for ours, native in zip(after_grads, before_grads, strict=True):
        assert rel_err(ours, native) <= TIGHT
    revert(model)
    assert model[1] is act


NOT_FUSED = [
    (lambda: hf_act.FastGELUActivation(), "rounded constant 0.7978845608"),
    (lambda: hf_act.QuickGELUActivation(), "QuickGELUActivation is x*sigmoid(1.702x)"),
    (lambda: hf_act.ACT2FN["gelu_10"], "ClippedGELUActivation is not in the registry"),
    (lambda: hf_act.ACT2FN["relu2"], "ReLUSquaredActivation is not in the registry"),
    (lambda: timm_act.QuickGELU(), "QuickGELU is x*sigmoid(1.702x)"),
    (lambda: timm_act.HardSwish(), "HardSwish is not in the registry"),
    (lambda: nn.ELU(), "ELU is not in the registry"),
]


@pytest.mark.parametrize(("make", "why"), NOT_FUSED)
def test_other_formulas_are_not_fused_and_the_report_says_why(make, why: str) -> None:
    act = make()
    model = nn.Sequential(nn.Linear(3, 3), act)
    report = convert(model)
    assert report.fused == [] and type(model[0]) is mbp.Linear and model[1] is act
    [(name, note)] = report.unfused
    assert name == "0" and note.startswith("1: ") and why in note
    assert f"0: torch.nn.Linear -> manualbp.Linear (not fused: {note})" in str(report)


def test_fast_gelu_really_differs_from_the_tanh_gelu() -> None:
    # Why FastGELU stays: its rounded constant shows in float64, far above the 1e-10 bound's noise.
    z = torch.linspace(-4, 4, 101, dtype=F64)
    fast = hf_act.FastGELUActivation()(z)
    assert 1e-13 < rel_err(fast, hf_act.NewGELUActivation()(z)) < 1e-9


def test_gpt2_mlp_with_a_formula_the_registry_lacks() -> None:
    config = transformers.GPT2Config(n_embd=8, activation_function="gelu_fast")
    mlp = GPT2MLP(16, config)
    report = convert(mlp)
    assert report.names == ["c_fc", "c_proj"] and report.fused == []
    assert report.unfused[0][0] == "c_fc" and "act: FastGELUActivation" in report.unfused[0][1]
    assert type(mlp.act) is hf_act.FastGELUActivation


def test_activation_function_given_as_a_function_is_not_fused() -> None:
    config = transformers.BertConfig(hidden_size=8, intermediate_size=16)
    block = transformers.models.bert.modeling_bert.BertIntermediate(config)
    del block.intermediate_act_fn  # as a config with hidden_act=<a function> leaves it
    block.intermediate_act_fn = torch.tanh
    report = convert(block)
    assert report.names == ["dense"] and report.unfused == [
        ("dense", "intermediate_act_fn is a function, not a module")
    ]


def test_replaced_forwards_are_not_trusted() -> None:
    config = transformers.GPT2Config(n_embd=8)
    mlp = GPT2MLP(16, config)
    mlp.forward = lambda h: mlp.c_proj(mlp.c_fc(h))  # type: ignore[method-assign]
    assert convert(mlp).unfused == [("c_fc", "GPT2MLP.forward was replaced")]
    act = hf_act.GELUActivation()
    act.forward = lambda h: h  # type: ignore[method-assign]
    report = convert(nn.Sequential(nn.Linear(2, 2), act))
    assert report.unfused == [("0", "1: GELUActivation.forward was replaced (e.g. by a kernel hub)")]


# ------------------------------------------------------------------------------------ patterns


class _Block(nn.Module):
    """An attribute-style block convert does not know: its forward could do anything."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.act(x)  # act is NOT applied to fc's output


class _SequentialMLP(nn.Sequential):
    """torchvision.ops.MLP's layout: a Sequential subclass that keeps Sequential.forward."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Dropout(0.0), nn.Linear(6, 2))


class _Reordered(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return self[0](self[1](x))  # the activation first


def test_unknown_blocks_are_not_fused_and_known_layouts_are() -> None:
    block = _Block().to(F64)
    x = torch.randn(3, 4, dtype=F64)
    expected = block(x)
    report = convert(block)
    assert report.fused == [] and type(block.act) is nn.GELU
    assert report.unfused == [
        (
            "fc",
            "act (GELU) follows it, but _Block is not a block whose forward is known to apply it "
            "to fc's output",
        )
    ]
    assert rel_err(block(x), expected) <= TIGHT

    mlp = _SequentialMLP().to(F64)
    expected = mlp(x)
    report = convert(mlp)
    assert [(r.name, r.new, r.activation) for r in report.fused] == [("0", "manualbp.LinearAct(relu)", "1")]
    assert rel_err(mlp(x), expected) <= TIGHT
    revert(mlp)
    assert type(mlp[1]) is nn.ReLU and mlp[1].inplace  # the very module, inplace kept

    reordered = _Reordered(nn.Linear(4, 4), nn.Tanh()).to(F64)
    expected = reordered(x)
    assert convert(reordered).unfused == [("0", "_Reordered overrides Sequential.forward")]
    assert rel_err(reordered(x), expected) <= TIGHT


def test_timm_mlp_with_norm_fuses_act_into_fc1() -> None:
    # fc1 -> act -> drop1 -> norm -> fc2: the norm comes after act, so fusing act into fc1 is exact.
    mlp = timm.layers.Mlp(6, 10, 3, norm_layer=nn.LayerNorm).to(F64)
    x = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    out = mlp(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    report = convert(mlp)
    assert [r.name for r in report.fused] == ["fc1"] and type(mlp.norm) is nn.LayerNorm
    out2 = mlp(x)
    assert rel_err(out2, out) <= TIGHT
    for ours, native in zip(torch.autograd.grad(out2.square().sum(), [x, *mlp.parameters()]), grads):
        assert rel_err(ours, native) <= TIGHT


# ------------------------------------------------------------------------------------ Conv1D


def test_conv1d_left_native_is_listed_with_its_reason() -> None:
    model = _gpt2()
    hooked = model.transformer.h[0].attn.c_attn
    hooked.register_forward_hook(lambda *_: None)

    class Sub(Conv1D):
        pass

    model.transformer.h[1].attn.c_proj = Sub(16, 16)
    report = convert(model)
    assert report.skipped == [
        ("transformer.h.0.attn.c_attn", "has hooks (they are bound to the old module)"),
        ("transformer.h.1.attn.c_proj", "Sub is a subclass of Conv1D, not Conv1D itself"),
    ]
    assert model.transformer.h[0].attn.c_attn is hooked
    assert str(report).startswith("7 replaced, 2 skipped\n")
    assert "  skipped transformer.h.0.attn.c_attn: has hooks" in str(report)


@pytest.mark.parametrize("backend", ["torch", "triton"])  # "triton": the kernels under the interpreter
def test_transposed_linear_matches_conv1d(backend: str) -> None:
    dtype = F64 if backend == "torch" else torch.float32
    conv = Conv1D(7, 5).to(dtype)
    nn.init.normal_(conv.bias)
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(2, 3, 5, dtype=dtype, requires_grad=True)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    convert(model)
    layer = model[0]
    assert type(layer) is TransposedLinear and layer.weight is conv.weight and layer.activation == "tanh"
    assert (layer.nf, layer.nx, layer.in_features, layer.out_features) == (7, 5, 5, 7)
    with mbp.use_backend(backend):
        out2 = model(x)
        grads2 = torch.autograd.grad(out2.square().sum(), [x, layer.weight, layer.bias])
    assert rel_err(out2, out) <= TOL[dtype]
    for ours, native in zip(grads2, grads, strict=True):
        assert ours.shape == native.shape and rel_err(ours, native) <= TOL[dtype]


def test_transposed_linear_errors_and_revert_of_one_built_by_hand() -> None:
    with pytest.raises(ValueError, match="nf: expected a positive int, got 0"):
        TransposedLinear(0, 3)
    with pytest.raises(ValueError, match="model: got a bare Conv1D"):
        convert(Conv1D(2, 2))
    with pytest.raises(ValueError, match="model: got a bare TransposedLinear"):
        revert(TransposedLinear(2, 2))
    model = nn.Sequential(TransposedLinear(3, 2))
    assert revert(model).skipped == [("0", "TransposedLinear not made by convert: no Conv1D recorded")]
    assert "nf=3, nx=2, bias=True, activation=identity" in repr(model)
