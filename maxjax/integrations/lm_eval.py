"""lm-evaluation-harness backend: ``MaxjaxLM``, registered as ``--model maxjax`` (extra ``maxjax[lm-eval]``).

    import lm_eval
    from maxjax.integrations.lm_eval import MaxjaxLM
    lm_eval.simple_evaluate(model=MaxjaxLM(), tasks=["hellaswag"])

or lm-eval's command line with this module imported first (it registers ``maxjax``):
``python -m maxjax.integrations.lm_eval run --model maxjax --model_args model=m.gguf,max_seq_len=2048 --tasks ...``

Scoring goes through the text pipeline as prompts of token ids with ``echo`` log-probabilities: every
request is one prefill row, many rows share a device call (the pipeline's continuous batching), and only the
log-probability of each token (and the top-1 id, for ``is_greedy``) leaves the device, never [T, vocab]
logits. Requests are tokenized and split as lm-eval's own ``hf`` backend does them (``TemplateLM``), so the
numbers compare one to one.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry fills itself only while empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from maxjax.pipelines.llm import LLM, SAMPLING_FIELDS

_GREEDY = {"top_k": 1}


def gen_settings(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> tuple[list[str], int, dict[str, Any]]:
    """(until strings, max new tokens, SamplingParams fields) of one ``generate_until`` request, read as lm-eval's
    backends read it: ``max_gen_toks`` (or an alias), greedy unless ``do_sample`` or a temperature above 0."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    sizes = [kwargs.pop(k, None) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")]
    max_gen_toks = int(next((s for s in sizes if s is not None), default_max_gen_toks))
    do_sample = kwargs.pop("do_sample", None)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if do_sample is False or temperature == 0.0:
        return until, max_gen_toks, dict(_GREEDY)
    sampling = {"temperature": temperature, **{k: v for k, v in kwargs.items() if k in SAMPLING_FIELDS}}
    return until, max_gen_toks, sampling


@register_model("maxjax")
class MaxjaxLM(TemplateLM):
    """An ``lm_eval.api.model.LM`` over a maxjax ``LLM``.

    ``model``: anything ``maxjax.load_model`` takes (None: SmolLM2-135M-Instruct); ``runtime``: RuntimeConfig
    fields (``max_seq_len``, ``max_batch_size``...). Or pass a loaded ``llm=LLM(...)``. The pipeline batches requests
    itself, up to ``max_batch_size``; lm-eval's ``batch_size`` above 1 sets it when not given (1, its default, and
    ``"auto"`` keep the runtime's). ``device`` (also lm-eval's) is ignored: JAX places the model.
    """

    def __init__(self, model: str | None = None, *, llm: LLM | None = None, batch_size: int | str | None = None,
                 max_gen_toks: int = 256, seed: int = 1234, progress: bool = True, device: Any = None,
                 **runtime: Any):
        super().__init__()
        if llm is not None and (model is not None or runtime):
            raise ValueError("give either llm or model and runtime fields, not both")
        if isinstance(batch_size, str) and batch_size.isdigit():
            batch_size = int(batch_size)
        if isinstance(batch_size, int) and batch_size > 1 and "max_batch_size" not in runtime:
            runtime["max_batch_size"] = batch_size
        self.llm = llm if llm is not None else LLM(model, chat=False, progress=progress, **runtime)
        self._tokenizer = self.llm.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.progress = progress
        # The longest sequence a request may reach: prompt plus its new tokens.
        self.max_length = min(self.llm.pipeline.config.max_seq_len, self._tokenizer.max_length)

    # -- tokenization (TemplateLM) -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos

    @property
    def prefix_token_id(self) -> int:
        bos = self._tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return self.llm.pipeline.model_name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        # No length limit here: long documents become rolling windows.
        ids = self._tokenizer.token_ids(string, True if add_special_tokens is None else bool(add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else list(ids)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode_tokens(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._tokenizer.chat_template if chat_template else None

    # -- scoring -------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether each continuation token is the argmax) per
        (key, context ids, continuation ids). A sequence longer than the runtime allows keeps its last tokens."""
        limit = self.max_length - 1  # scored as a prompt: one position stays free for the token it samples
        prompts = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("continuation is empty: nothing to score")
            if len(continuation) >= limit:
                raise ValueError(f"continuation is {len(continuation)} tokens; at most {limit - 1} fit the runtime's "
                                 f"max_seq_len {self.llm.pipeline.config.max_seq_len}")
            prompts.append((list(context) + list(continuation))[-limit:])
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # like-sized prompts share programs
        completions = self.llm.complete([prompts[i] for i in order], echo=True, logprobs=1, max_new_tokens=1,
                                        progress=self.progress and not disable_tqdm, **_GREEDY)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(prompts)
        for i, completion in zip(order, completions):
            n = len(requests[i][2])
            entries = (completion.prompt_log_probabilities or [])[-n:]
            targets = prompts[i][-n:]
            if len(entries) != n:
                raise RuntimeError(f"request {i}: {len(entries)} prompt log-probabilities for {n} continuation tokens")
            total = sum(float(lp.token_log_probabilities[0]) for lp in entries)
            greedy = all(next(iter(lp.top_log_probabilities[0])) == token for lp, token in zip(entries, targets))
            results[i] = (total, greedy)
            if requests[i][0] is not None:  # None: a window of a rolling request
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: disjoint windows (lm-eval's rolling windows, one context token),
        every window of every document in one batch."""
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 2, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until one of its ``until`` strings (or eos), without the stop string."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        settings = [gen_settings(req.args[1], self.max_gen_toks) for req in requests]
        prompts = []
        for req, (_, max_gen_toks, _) in zip(requests, settings):
            room = self.max_length - max_gen_toks
            if room < 1:
                raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in the runtime's "
                                 f"max_seq_len {self.max_length}")
            prompts.append(self.tok_encode(req.args[0], left_truncate_len=room))
        requests_fields = [dict(stop=[s for s in until if s] or None, max_new_tokens=max_gen_toks,
                                seed=self.seed, **sampling) for until, max_gen_toks, sampling in settings]
        texts = self._complete_each(prompts, requests_fields, not disable_tqdm)
        out = []
        for req, text, (until, _, _) in zip(requests, texts, settings):
            for term in until + [eos]:  # as the hf backend: cut at the first stop string
                if term:
                    text = text.split(term)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _complete_each(self, prompts: list[list[int]], fields: list[dict[str, Any]], show: bool) -> list[str]:
        """Texts of prompts whose fields differ, batched together when their fields are equal."""
        groups: dict[str, list[int]] = {}
        for i, f in enumerate(fields):
            groups.setdefault(repr(sorted(f.items())), []).append(i)
        texts = [""] * len(prompts)
        for members in groups.values():
            done = self.llm.complete([prompts[i] for i in members], progress=self.progress and show,
                                     **fields[members[0]])
            for i, completion in zip(members, done):
                texts[i] = completion.text
        return texts


if __name__ == "__main__":  # lm-eval's own command line, with --model maxjax registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
