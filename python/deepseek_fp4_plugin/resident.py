"""ResidentWeightStore: every weight on the device, converted once at load."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor

from ._ext import _C
from .checkpoint import CheckpointSource
from .conversion import WeightConverter, estimate_bytes  # noqa: F401  (estimate_bytes re-exported)
from .precision import PrecisionPolicy, resolve_compute_dtype
from .weights import BuiltWeights, DenseLinear, LayerWeights, Linear, WeightStore, empty_counters


class ResidentWeightStore(BuiltWeights, WeightStore):
    """Every weight resident on ``device``, converted once at load.

    Parameters
    ----------
    source : CheckpointSource (safetensors folder or in-memory state dict)
    device : torch device the model runs on
    compute_dtype : None (float32 on CPU, bfloat16 on CUDA), torch.float32 or torch.bfloat16
    policy : PrecisionPolicy, or "default" / "fp4" / "bf16"
    progress : show a tqdm bar while loading
    """

    def __init__(self, source: CheckpointSource, device: Union[str, torch.device] = "cpu",
                 compute_dtype: Union[None, str, torch.dtype] = None,
                 policy: Union[None, str, PrecisionPolicy] = None, progress: bool = False):
        self.config = source.config
        self.device = resolve_store_device(device)
        self.compute_dtype = resolve_compute_dtype(compute_dtype, self.device)
        self.policy = PrecisionPolicy.parse(policy)
        conv = WeightConverter(source, self.device, self.compute_dtype, self.policy)
        c = self.config
        it: Iterable[int] = range(c.num_hidden_layers)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="loading layers", unit="layer")
        self._embed = conv.embedding()
        self._layers: List[LayerWeights] = [conv.layer(layer) for layer in it]
        self._norm = conv.final_norm()
        self._lm_head: Linear = conv.lm_head(self._embed)
        self.formats: Dict[str, str] = conv.formats   # module → runtime format ("fp4" | "dense")

    # ---- WeightStore ----
    @property
    def graph_safe(self) -> bool:
        return all(lw.moe is None or lw.moe.experts.graph_safe for lw in self._layers)

    def memory_report(self) -> Dict[str, int]:
        rep = {"embedding": nbytes(self._embed), "lm_head": self._lm_head.nbytes if not
               self.config.tie_word_embeddings else 0, "attention": 0, "dense_mlp": 0, "experts": 0,
               "shared_experts": 0, "router_and_norms": nbytes(self._norm)}
        for lw in self._layers:
            add_layer_report(rep, lw)
            if lw.moe is not None:
                rep["experts"] += lw.moe.experts.nbytes
        rep["total"] = sum(rep.values())
        return rep

    def counters(self) -> Dict[str, object]:
        """WeightStore.counters() with every nested key of the paging store's counters too:
        counts zero, rates None (nothing pages; every expert is always on the device)."""
        out = empty_counters()
        moe = sum(1 for lw in self._layers if lw.moe is not None)
        out.update(experts=_C.paging.zero_expert_counters(),
                   per_layer=[_C.paging.zero_expert_counters() for _ in range(moe)],
                   files=_C.paging.zero_read_counters())
        return out


def resolve_store_device(device: Union[str, torch.device]) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def add_layer_report(rep: Dict[str, int], lw: LayerWeights) -> None:
    """Adds the per-layer (non-expert) bytes of ``lw`` to a memory report."""
    a = lw.attn
    linears = (a.qkv_a, a.q_b, a.q, a.kv_a, a.kv_b, a.o)
    rep["attention"] += sum(x.nbytes for x in linears if x is not None)
    if not isinstance(a.kv_b, DenseLinear):   # otherwise w_uk / w_uv view kv_b's weight
        rep["attention"] += nbytes(a.w_uk) + nbytes(a.w_uv)
    rep["router_and_norms"] += nbytes(lw.input_norm) + nbytes(lw.post_attention_norm)
    if lw.mlp is not None:
        rep["dense_mlp"] += lw.mlp.gate_up.nbytes + lw.mlp.down.nbytes
    if lw.moe is not None:
        rep["router_and_norms"] += nbytes(lw.moe.router) + nbytes(lw.moe.correction_bias)
        if lw.moe.shared is not None:
            rep["shared_experts"] += lw.moe.shared.gate_up.nbytes + lw.moe.shared.down.nbytes


def nbytes(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()
