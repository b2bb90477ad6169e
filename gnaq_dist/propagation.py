"""LightGCN propagation, on the full graph or on sampled message-flow graphs (blocks).

Both paths compute ``Q^0 = f(H^0, 0)``, ``H^(l+1) = A_hat Q^l``, ``Q^(l+1) = f(H^(l+1), l+1)``
and return ``[Q^0 .. Q^L]``; with the identity ``f`` this is plain LightGCN. The per-layer
transform ``f`` (a quantizer, a nonlinearity) is passed in as a callable, so this module
does not depend on the embedding methods. Layer combination (mean, weighted) is left to
the caller.

On blocks, an edge's weight is the full-graph ``A_hat`` entry times ``deg_v / s_v``
(``s_v`` sampled in-neighbours of ``v`` out of ``deg_v``, drawn without replacement), so a
sampled aggregation is an unbiased estimate of the full one and exact at full fan-out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gnaq_dist._dgl import dgl
from gnaq_dist.errors import GnaqInputError
from gnaq_dist.graph import BipartiteGraph, spmm

LayerFn = Callable[[torch.Tensor, int], torch.Tensor]

#: block.edata key of the re-weighted edge weights that :func:`propagate_blocks` reads.
BLOCK_WEIGHT = "w"
#: block.dstdata key of each dst node's sampled in-degree (``s_v``).
SAMPLED_DEGREE = "sampled_deg"


def _check_layers(num_layers: int) -> None:
    if num_layers < 0:
        raise GnaqInputError(f"num_layers must be >= 0, got {num_layers}")


def propagate_full(
    graph: BipartiteGraph, x0: torch.Tensor, num_layers: int, layer_fn: LayerFn | None = None
) -> list[torch.Tensor]:
    """``[Q^0 .. Q^L]`` for all N nodes by sparse matrix products; differentiable in ``x0``."""
    _check_layers(num_layers)
    if x0.dim() != 2 or x0.shape[0] != graph.n_nodes:
        raise GnaqInputError(f"x0 must be ({graph.n_nodes}, d), got {tuple(x0.shape)}")
    adj = graph.adjacency(dtype=x0.dtype, device=x0.device)
    q = layer_fn(x0, 0) if layer_fn is not None else x0
    out = [q]
    for layer in range(1, num_layers + 1):
        h = spmm(adj, q)
        q = layer_fn(h, layer) if layer_fn is not None else h
        out.append(q)
    return out


def attach_block_weights(graph: BipartiteGraph, blocks: Sequence) -> None:
    """Set ``edata[BLOCK_WEIGHT]`` (unbiased re-weighted ``A_hat`` entries) on sampled blocks.

    Blocks must come from :func:`dgl.to_block` of frontiers sampled on
    ``graph.dgl_graph()``, so that ``edata[dgl.EID]`` are edge ids of ``graph``.
    Also records ``dstdata[SAMPLED_DEGREE]``.
    """
    for block in blocks:
        eid = block.edata[dgl.EID].to(torch.int64)
        _, dst_local = block.edges()
        sampled = block.in_degrees().to(torch.float32)
        full = graph.degree[block.dstdata[dgl.NID].to(torch.int64)]
        factor = full / sampled.clamp(min=1.0)  # dst nodes with no sampled edge have no weight to scale
        block.dstdata[SAMPLED_DEGREE] = sampled
        block.edata[BLOCK_WEIGHT] = graph.norm[eid] * factor[dst_local.to(torch.int64)]


def propagate_blocks(
    blocks: Sequence, x_input: torch.Tensor, num_layers: int, layer_fn: LayerFn | None = None
) -> list[torch.Tensor]:
    """``[Q^0 .. Q^L]`` at the seed (output) nodes of the last block.

    ``x_input`` holds ``H^0`` of the input nodes (``blocks[0].srcdata[dgl.NID]``, in that
    order). DGL puts a block's dst nodes first among its src nodes, so the seeds are the
    leading rows of every layer's node set and each layer's entry is a prefix slice.
    Gradients flow back to ``x_input``.
    """
    _check_layers(num_layers)
    if len(blocks) != num_layers:
        raise GnaqInputError(f"got {len(blocks)} blocks for {num_layers} layers")
    n_in = blocks[0].num_src_nodes() if blocks else x_input.shape[0]
    if x_input.dim() != 2 or x_input.shape[0] != n_in:
        raise GnaqInputError(f"x_input must be ({n_in}, d), got {tuple(x_input.shape)}")
    n_seeds = blocks[-1].num_dst_nodes() if blocks else x_input.shape[0]
    q = layer_fn(x_input, 0) if layer_fn is not None else x_input
    out = [q[:n_seeds]]
    for layer, block in enumerate(blocks, start=1):
        if BLOCK_WEIGHT not in block.edata:
            raise GnaqInputError(f"block {layer - 1} has no edata[{BLOCK_WEIGHT!r}]: call attach_block_weights first")
        w = block.edata[BLOCK_WEIGHT].to(dtype=q.dtype, device=q.device).unsqueeze(-1)
        h = dgl.ops.u_mul_e_sum(block, q, w)
        q = layer_fn(h, layer) if layer_fn is not None else h
        out.append(q[:n_seeds])
    return out


__all__ = [
    "BLOCK_WEIGHT",
    "SAMPLED_DEGREE",
    "LayerFn",
    "attach_block_weights",
    "propagate_blocks",
    "propagate_full",
]


@torch.no_grad()
def final_from_packed(graph: BipartiteGraph, table, combine: Callable[[list[torch.Tensor]], torch.Tensor],
                      num_layers: int) -> torch.Tensor:
    """All nodes' final embeddings from a packed table, as inference computes them.

    ``table`` is a :class:`~gnaq_dist.quant.packing.PackedTable`: a layer-0 table is
    dequantized and propagated; a table of already-propagated layers (BiGeaR) is only
    weighted per group. Evaluation, checkpoints and bundles share this one path.
    """
    x = torch.from_numpy(table.dequantize())
    if table.needs_propagation:
        return combine(propagate_full(graph, x, num_layers))
    weights = torch.tensor(table.group_weights or [1.0] * table.groups, dtype=x.dtype)
    grouped = x.reshape(x.shape[0], table.groups, -1) * weights.view(1, -1, 1)
    return grouped.reshape(x.shape[0], -1)
