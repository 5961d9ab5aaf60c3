"""OpenAI logprobs shapes from the engine's per-token
(logprob, [(token_id, logprob)] top-n) entries."""

from __future__ import annotations


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tok, entries) -> dict:
    """``choices[].logprobs`` of a chat completion:
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def item(token_id, logprob):
        text = token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, (logprob, top) in entries:
        content.append({**item(token_id, logprob), "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content}


def completion_logprobs(tok, entries, offset: int = 0) -> tuple[dict, int]:
    """``choices[].logprobs`` of a text completion, and the text offset after its tokens."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, (logprob, top) in entries:
        text = token_text(tok, token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({token_text(tok, t): lp for t, lp in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


class LogprobsFormatter:
    """Formats the logprobs of each choice of one request: None when the request did not ask for
    them; a text completion numbers its text offsets on from the choice's previous chunk."""

    def __init__(self, tok, chat: bool, streams):
        self.tok = tok
        self.chat = chat
        self.wanted = streams[0].want_logprobs
        self.offsets = [0] * len(streams)

    def format(self, i: int, entries) -> dict | None:
        if not self.wanted:
            return None
        if self.chat:
            return chat_logprobs(self.tok, entries)
        out, self.offsets[i] = completion_logprobs(self.tok, entries, self.offsets[i])
        return out
