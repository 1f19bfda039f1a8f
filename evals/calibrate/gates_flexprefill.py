"""FlexPrefill's gated forward for gate gains: its one-pass cells, replayed with the gates on the prompt's last rows.

FlexPrefill (arXiv 2502.20766) picks every head's cells from the last query block of the whole forward
(the probe), and a query-aware head's cells by one rule over all its query blocks, so a prompt cannot
be split into a prefix and gated last rows that select their own cells. Here a first session, without
gradients, prefills the prompt in one forward, as FlexPrefill serves it, and records every layer's
cells. A second session prefills the prompt's first rows (a whole number of blocks) and then its last
rows (at least `TAIL_BLOCKS` blocks) with those recorded cells, the last rows under the gates
(`gate_mix.gate_session`); at g = 0 that reproduces the one-pass attention. The gated rows attend through
a token-level mask of their cells (differentiable; the block-sparse back-ends are not). FlexPrefill
decodes densely, so the answer's later tokens are teacher-forced in one dense forward after the prompt
and the loss is the NLL of every answer token: its misses are often a later digit of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache

from kvmux.evals.calibrate.gate_mix import gate_session
from kvmux.models.info import ModelInfo
from kvmux.models.runner import Runner
from kvmux.policies.attention_call import AttentionCall
from kvmux.policies.base import PolicySession, SessionRequest
from kvmux.policies.dense import causal_mask, sdpa
from kvmux.policies.presets import Preset
from kvmux.policies.sparse.grid import first_query_block, num_blocks, query_blocks

TAIL_BLOCKS = 2  # the gated rows: more than one block, or FlexPrefill would attend them densely


@contextmanager
def without_lean_decoder(runner: Runner) -> Iterator[None]:
    """One-token forwards through the model's own layers (the lean decoder is inference-only)."""
    lean, runner.lean = runner.lean, None
    try:
        yield
    finally:
        runner.lean = lean


def forward_logits(runner: Runner, session: PolicySession, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of every position of `ids`, without the runner's inference mode."""
    prompt = torch.tensor([ids], device=session.info.device)
    return Runner.forward.__wrapped__(runner, session, prompt, all_logits=True)[0]


def record_cells(runner: Runner, info: ModelInfo, preset: Preset, ids: list[int]) -> dict[int, torch.Tensor]:
    """Every layer's cells [1, Hq, nqb, nkb] of the prompt prefilled in one forward (none when it is dense)."""
    session = preset.policy.new_session(preset.params, info, SessionRequest())
    cells: dict[int, torch.Tensor] = {}
    select = session.select

    def recording(call: AttentionCall) -> torch.Tensor:
        cells[call.layer_idx] = select(call)
        return cells[call.layer_idx]

    session.select = recording
    try:
        with torch.no_grad():
            forward_logits(runner, session, ids)
    finally:
        session.close()
    return cells


def token_mask(blocks: torch.Tensor, num_queries: int, num_keys: int, block_size: int) -> torch.Tensor:
    """bool [1, H, Tq, Tk] of a grid's cells [1, H, nqb, nkb], causal inside them."""
    causal = causal_mask(num_queries, num_keys, blocks.device)
    rows = torch.arange(num_keys - num_queries, num_keys, device=blocks.device) // block_size
    rows = rows - first_query_block(num_queries, num_keys, block_size)
    cols = torch.arange(num_keys, device=blocks.device) // block_size
    return blocks[:, :, rows][:, :, :, cols] & causal


def replay(session: PolicySession, cells: dict[int, torch.Tensor]) -> None:
    """Make the session use the recorded cells, and attend through their token mask while autograd is on."""
    bs, sparse = session.params.block_size, session.sparse_attention

    def recorded(call: AttentionCall) -> torch.Tensor:
        tq, tk = call.query.shape[2], call.key.shape[2]
        first = first_query_block(tq, tk, bs)
        return cells[call.layer_idx][:, :, first : first + query_blocks(tq, tk, bs), : num_blocks(tk, bs)]

    def masked(call: AttentionCall, blocks: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return sparse(call, blocks)
        mask = token_mask(blocks, call.query.shape[2], call.key.shape[2], bs)
        return sdpa(call.query, call.key, call.value, mask, call.scaling)

    session.select, session.sparse_attention = recorded, masked
    session.is_short = lambda num_keys: not cells  # the rows split as the one pass was: all sparse or all dense


def flexprefill_answer_nll(
    runner: Runner, info: ModelInfo, preset: Preset, ids: list[int], answer: list[int], gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of the answer tokens after `ids`, log-probabilities [vocab] of the first) under the FlexPrefill
    preset with its heads mixed toward dense by `gates` [layers, Hq] in the prompt's last rows and the
    answer's rows (differentiable in `gates`)."""
    params = preset.params
    if params.prefill_chunk or len(ids) > params.max_single_pass_tokens:
        raise ValueError(
            "FlexPrefill gate gains need the one-pass prefill: prefill_chunk 0 and a prompt of at most "
            f"max_single_pass_tokens ({params.max_single_pass_tokens}); the prompt has {len(ids)} tokens"
        )
    bs = params.block_size
    with without_lean_decoder(runner):
        cells = record_cells(runner, info, preset, ids)
        session = preset.policy.new_session(params, info, SessionRequest())
        session.cache = DynamicCache()  # appends by concatenation: the answer's rows keep the saved K/V intact
        replay(session, cells)
        gate_session(session, gates)
        prefix = max(0, (len(ids) - TAIL_BLOCKS * bs) // bs * bs)
        try:
            if prefix:
                with torch.no_grad():
                    forward_logits(runner, session, ids[:prefix])
            with torch.enable_grad():
                first = forward_logits(runner, session, ids[prefix:])[-1].float().log_softmax(-1)
                nll = -first[answer[0]]
                if len(answer) > 1:
                    rest = forward_logits(runner, session, answer[:-1]).float().log_softmax(-1)
                    nll = nll - rest.gather(-1, torch.tensor(answer[1:], device=rest.device)[:, None]).sum()
        finally:
            session.close()
    return nll, first
