"""Structured output with llguidance: a request's grammar masks the target rows it verifies and
the drafts MTP proposes for it.

llguidance was chosen over xgrammar: a small self-contained wheel (no transformers or TVM runtime
pulled in), masks computed on the CPU for any device, and ``rollback``, which drafting needs: the
matcher walks a request's drafts to mask each verify row (and each next draft) and steps back over
them, so it only ever holds the tokens actually emitted.

A request's matcher follows its output lazily: before each use, ``sync`` feeds it the output tokens
it has not seen (the ones emitted since), so no step of the engine has to report to it.
"""

from __future__ import annotations

import weakref

import llguidance
import llguidance.numpy
import torch

from mtpserve.engine.errors import RequestError

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# JSON as models write it, on one line or indented: between two tokens of JSON nothing, one space,
# or a newline and up to 32 spaces, so a small model cannot loop on whitespace. Answers stay on the
# model's own path, where MTP drafts are accepted most (docs/BENCHMARKS.md, structured output).
JSON_OPTIONS = {"whitespace_flexible": False, "whitespace_pattern": r"( |\n {0,32})?",
                "item_separator": ",", "key_separator": ":"}
# tool-call arguments, written on one line as the tool-call formats show them
COMPACT_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ",
                        "key_separator": ": "}


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids) -> llguidance.LLTokenizer:
    """The llguidance view of ``tokenizer``, built once (about a second for a large vocabulary)."""
    cached = _LL_TOKENIZERS.get(tokenizer)
    if cached is None:
        cached = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                        eos_token=sorted(eos_token_ids))
        _LL_TOKENIZERS[tokenizer] = cached
    return cached


def json_schema_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def lark_grammar(text: str) -> str:
    """A grammar in llguidance's Lark syntax; ValueError when it does not parse."""
    return llguidance.LLMatcher.grammar_from_lark(text)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32 bit words, all tokens allowed. llguidance's numpy helpers, not
    its torch ones: importing ``llguidance.torch`` compiles a kernel with ``torch.compile``, which
    loads TorchDynamo and Inductor (seconds at every start) for a function the engine never calls."""
    return torch.from_numpy(llguidance.numpy.allocate_token_bitmask(rows, vocab_size))


def fill_bitmask(matcher: llguidance.LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """Row ``row`` of ``bitmask`` (a CPU tensor): the tokens ``matcher`` allows next."""
    llguidance.numpy.fill_next_token_bitmask(matcher, bitmask.numpy(), row)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool from llguidance's [B, ceil(V / 32)] int32 bit words."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


class Grammar:
    """One request's matcher, and its count of the drafts verified under it. The grammar masks
    each draft MTP proposes and cuts the drafts at the first it forbids (one chosen where a
    reduced draft vocabulary holds none of several allowed tokens), so
    ``num_forbidden_drafts`` (drafts verified that the grammar does not allow, and those after
    them) stays 0. Drafts after an end-of-answer draft are not counted: the answer ends there,
    they are never emitted."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, vocab_size: int,
                 param: str = "response_format"):
        try:
            self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        except ValueError as e:
            raise RequestError(f"invalid grammar: {e}", param=param) from None
        error = self.matcher.get_error()
        if error:
            raise RequestError(f"invalid grammar: {error}", param=param)
        self.vocab_size = vocab_size
        self.eos_token_ids = set(tokenizer.eos_tokens)
        self.num_consumed = 0
        self.num_verified_drafts = 0
        self.num_forbidden_drafts = 0
        # packed masks drafting computed, by draft prefix, for the output length they follow:
        # the verify step after it needs the same rows
        self.drafted_masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.drafted_after = -1

    def sync(self, output_token_ids: list[int]) -> None:
        """Feed the output tokens emitted since the last call."""
        new = output_token_ids[self.num_consumed:]
        if new:
            self.matcher.try_consume_tokens(list(new))
        self.num_consumed = len(output_token_ids)

    def verify_masks(self, output_token_ids: list[int], drafts: list[int]) -> torch.Tensor:
        """The rows of ``_masks`` for a verify step, counting its drafts."""
        allowed, num_allowed = self._masks(output_token_ids, drafts)
        ends = [j for j, token in enumerate(drafts) if token in self.eos_token_ids]
        num_used = len(drafts)
        if ends:
            num_used = ends[0] + 1
        self.num_verified_drafts += num_used
        self.num_forbidden_drafts += max(num_used - num_allowed, 0)
        return allowed

    def num_allowed(self, output_token_ids: list[int], drafts: list[int]) -> int:
        """How many of ``drafts`` in a row the grammar allows after the output."""
        self.sync(output_token_ids)
        consumed = self.matcher.try_consume_tokens(list(drafts))
        num_allowed = self._with_end(drafts, consumed)
        if consumed:
            self.matcher.rollback(consumed)
        return num_allowed

    def next_mask(self, output_token_ids: list[int], drafts: list[int]) -> torch.Tensor:
        """[1, V] bool: the tokens allowed after the output and ``drafts`` (after the drafts up to
        the first the grammar forbids): what the draft after them may be."""
        self.sync(output_token_ids)
        consumed = self.matcher.try_consume_tokens(list(drafts))
        bitmask = allocate_bitmask(1, self.vocab_size)
        fill_bitmask(self.matcher, bitmask, 0)
        if consumed:
            self.matcher.rollback(consumed)
        self._keep(len(output_token_ids), drafts[:consumed], bitmask[0])
        return unpack(bitmask, self.vocab_size)

    def _keep(self, num_output: int, prefix: list[int], packed: torch.Tensor) -> None:
        """Remember the mask after the output and a draft prefix (earlier outputs' are dropped)."""
        if num_output != self.drafted_after:
            self.drafted_masks = {}
            self.drafted_after = num_output
        self.drafted_masks[tuple(prefix)] = packed.clone()

    def _fill(self, bitmask: torch.Tensor, row: int, num_output: int, prefix: list[int]) -> None:
        """Row ``row`` of ``bitmask``: the mask after the output and ``prefix``, as drafting
        computed it if it did, else from the matcher (which stands after them)."""
        kept = None
        if num_output == self.drafted_after:
            kept = self.drafted_masks.get(tuple(prefix))
        if kept is not None:
            bitmask[row] = kept
            return
        fill_bitmask(self.matcher, bitmask, row)

    def _masks(self, output_token_ids: list[int], drafts: list[int]) -> tuple[torch.Tensor, int]:
        """[k + 1, V] bool: the tokens allowed after the output and each prefix d_1..d_j of the
        drafts, and how many drafts in a row the grammar allows. Rows past a draft the grammar
        forbids repeat the last allowed row (the target rejects that draft, so they are never
        used)."""
        self.sync(output_token_ids)
        rows = len(drafts) + 1
        bitmask = allocate_bitmask(rows, self.vocab_size)
        consumed = 0
        for j in range(rows):
            self._fill(bitmask, j, len(output_token_ids), drafts[:j])
            if j == len(drafts) or self.matcher.try_consume_tokens([drafts[j]]) != 1:
                break
            consumed += 1
        num_allowed = self._with_end(drafts, consumed)
        bitmask[consumed + 1:] = bitmask[consumed]
        if consumed:
            self.matcher.rollback(consumed)
        return unpack(bitmask, self.vocab_size), num_allowed

    def _with_end(self, drafts: list[int], consumed: int) -> int:
        """The drafts allowed when the matcher took the first ``consumed``: an end-of-answer token
        is taken by the matcher while the grammar may end, and not once it has (then it is the
        only token allowed); both count as allowed."""
        if consumed < len(drafts) and drafts[consumed] in self.eos_token_ids:
            if self.matcher.is_stopped():
                return consumed + 1
        return consumed


def allowed_drafts(grammar: Grammar | None, output_token_ids: list[int],
                   drafts: list[int]) -> list[int]:
    """``drafts`` up to the first the request's grammar forbids (all of them without one)."""
    if grammar is None:
        return drafts
    return drafts[:grammar.num_allowed(output_token_ids, drafts)]


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` with the disallowed tokens at -inf. A row whose finite logits hold no allowed
    token (a reduced draft vocabulary without it) becomes the grammar's only token when it allows
    one (a forced key or brace: the target, masked by the same grammar, takes it too), and is left
    as it is otherwise (that draft is then cut)."""
    allowed = allowed.to(logits.device)
    some = (allowed & torch.isfinite(logits)).any(dim=-1, keepdim=True)
    forced = ~some & (allowed.sum(dim=-1, keepdim=True) == 1)
    masked = logits.masked_fill(~allowed & (some | forced), float("-inf"))
    return masked.masked_fill(allowed & forced, 0.0)
