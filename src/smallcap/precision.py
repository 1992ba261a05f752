"""Fast inference modes: reduced-precision weights (`--dtype`) and int8 dynamic quantization (`--quantize`).

Both are opt-in and may change some captions (float32 without quantization is exact). In reduced precision the
LM head still computes its logits in float32 (`Float32Logits`): rounding the logits to bfloat16 (8 significant bits)
turns near-ties between beams into ties broken the other way, the main reason bfloat16 captions differed from
float32's on the trained mini model (benchmarks/results/fast_modes_quality.md). int8 quantizes the
decoder's linear layers, LM head included, with torch's dynamic quantization (int8 weights, activations
quantized per batch, CPU only); GPT-2's `Conv1D` layers are first turned into the equivalent `nn.Linear`
(transposed weight), since dynamic quantization only knows `nn.Linear`. The vision encoder stays float32: it
runs once per image, and retrieval queries are embedded from its states.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from smallcap.errors import SmallCapError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE_MODES = ("none", "int8")


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """The `--dtype` name of a dtype (None: float32); raises SmallCapError for one that is not offered."""
    if dtype is None:
        return "float32"
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise SmallCapError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def check_precision(device: str, dtype: str | torch.dtype | None = "float32", quantize: str = "none") -> None:
    """Refuse combinations that cannot run or would be slower than the default, naming the fix."""
    name = dtype_name(dtype)
    try:
        on_cpu = torch.device(device).type == "cpu"
    except RuntimeError:
        raise SmallCapError(f"unknown device {device!r}; expected cpu, cuda, cuda:1, ...") from None
    if quantize not in QUANTIZE_MODES:
        raise SmallCapError(f"unsupported quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    if name == "float16" and on_cpu:
        raise SmallCapError("--dtype float16 is for GPUs (--device cuda): on CPU float16 matrix products are about "
                            "2x slower than float32 (measured); use --dtype bfloat16 for reduced precision on CPU")
    if quantize == "int8" and not on_cpu:
        raise SmallCapError(f"--quantize int8 (dynamic quantization) runs on CPU only, not on {device!r}; on a GPU "
                            "use --dtype bfloat16 or float16")
    if quantize == "int8" and name != "float32":
        raise SmallCapError(f"--quantize int8 keeps float32 activations; it cannot be combined with --dtype {name}")


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """The `nn.Linear` computing what a GPT-2 `Conv1D` computes (its weight is stored transposed, (in, out))."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _replace_conv1d(module: nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            setattr(module, name, conv1d_as_linear(child))
            replaced += 1
        else:
            replaced += _replace_conv1d(child)
    return replaced


def quantize_decoder_int8(model: nn.Module) -> nn.Module:
    """Quantize `model.decoder`'s linear layers (Conv1D converted first, LM head included) to int8, in place.

    Uses torch's eager dynamic quantization (fbgemm/x86 kernels). torch marks that API deprecated in favour of
    torchao, but it is still the fastest int8 path in torch itself (measured ~3-4x float32 per decode-step
    matrix product on this CPU); its deprecation warnings are silenced here only.
    """
    from torch.ao.quantization import quantize_dynamic

    _replace_conv1d(model.decoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        model.decoder = quantize_dynamic(model.decoder, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def quantization_of(model: nn.Module) -> str:
    """"int8" when the model's decoder was quantized by `quantize_decoder_int8`, else "none"."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return "int8" if any(isinstance(m, DynamicQuantizedLinear) for m in model.modules()) else "none"


class Float32Logits(nn.Module):
    """An LM head that computes logits in float32 from reduced-precision hidden states.

    Holds a float32 copy of the head's weight (the values it has now: bfloat16-rounded ones when the model was
    loaded in bfloat16), so tied input embeddings stay in reduced precision. For GPT-2 small this costs 154 MB.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach().float().clone(), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 logits of `hidden_states` (any floating dtype)."""
        return F.linear(hidden_states.float(), self.weight, self.bias)


def keep_logits_float32(decoder: nn.Module) -> nn.Module:
    """Swap `decoder`'s output embeddings (its LM head) for a `Float32Logits` of it, in place; returns `decoder`."""
    head = decoder.get_output_embeddings()
    if not isinstance(head, Float32Logits):
        decoder.set_output_embeddings(Float32Logits(head))
    return decoder


def apply_precision(model: nn.Module, device: str, dtype: str | torch.dtype | None = "float32",
                    quantize: str = "none", float32_logits: bool = True) -> nn.Module:
    """Move a loaded SmallCap model to `device` in the given precision mode (checked by `check_precision`).

    In reduced precision the logits are computed in float32 (`Float32Logits`) unless `float32_logits` is False
    (all in reduced precision: what this mode did before; kept for measuring the difference).
    """
    check_precision(device, dtype, quantize)
    name = dtype_name(dtype)
    model = model.to(device=device, dtype=DTYPES[name])
    if name != "float32" and float32_logits:
        keep_logits_float32(model.decoder)
    if quantize == "int8":
        model = quantize_decoder_int8(model)
    return model.eval()
