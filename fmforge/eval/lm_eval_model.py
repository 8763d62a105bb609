"""fmforge models inside EleutherAI's lm-evaluation-harness, registered as model type "fmforge".

The one-line path (this module registers the model type, then runs lm-eval's own command line):

    python -m fmforge.eval.lm_eval_model --model fmforge --model_args checkpoint=RUN_OR_CHECKPOINT \\
        --tasks fmforge_tiny_mc,fmforge_tiny_gen,fmforge_tiny_ppl --include_path fmforge/eval/lm_eval_tasks

From Python, import this module (which registers "fmforge") and call lm_eval.simple_evaluate:

    import lm_eval, fmforge.eval.lm_eval_model
    lm_eval.simple_evaluate(model="fmforge", model_args="checkpoint=runs/quickstart/model", tasks=[...])

Conventions follow lm-eval's Hugging Face model ("hf"), so that the same model scores the same through
either: contexts start with bos when the tokenizer adds one (its own `add_bos_token`, as transformers'
tokenizer does for the exported model), unless `add_bos_token` says otherwise, and not when the text already
starts with the bos string; an empty context is replaced by the bos
token (eos when the tokenizer has none); texts are left-truncated to the model's context.
Model arguments: checkpoint (required), device (cpu), batch_size (1), max_length (the model's context),
add_bos_token (the tokenizer's own setting).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own model types first: its registry skips them once non-empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..infer.engine import Engine, GenerationRequest
from ..infer.sampling import SamplingParams
from ..checkpoint import load_model_and_tokenizer

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")  # small local tasks: --include_path this


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("fmforge")
class FmforgeLM(TemplateLM):
    """An fmforge checkpoint (or the latest checkpoint of a run directory) as an lm-eval model."""

    def __init__(self, checkpoint: str, device: str | None = "cpu", batch_size: int | str = 1,
                 max_length: int | None = None, add_bos_token: bool | str | None = None, **unused):
        super().__init__()
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's command line asks for cuda by default; its "hf" model falls back the same way
        self.model, self.tokenizer, self.checkpoint = load_model_and_tokenizer(checkpoint, device)
        self._device = self.model.embed_tokens.weight.device
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else self.model.config.context_length
        self.add_bos_token = self.tokenizer.add_bos_token if add_bos_token is None else _flag(add_bos_token)

    # ---- tokens --------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Like Hugging Face tokenizers, special-token strings in the text become their ids.
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_bos = False  # as lm-eval's hf model: a text that already starts with bos gets no second one
        return self.tokenizer.encode(string, add_bos=add_bos, allow_special=True)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- scoring -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request
        ((context, continuation) strings, context ids, continuation ids). Batched with right padding, which a
        causal model never attends to; the longest sequences go first."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[start:start + self.batch_size]
            inputs, spans = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                tokens = (context + continuation)[-(self.max_length + 1):]
                inputs.append(tokens[:-1])
                spans.append((len(tokens) - 1 - len(continuation), continuation))
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), width, dtype=torch.long)
            for row, tokens in enumerate(inputs):
                batch[row, :len(tokens)] = torch.tensor(tokens)
            logprobs = F.log_softmax(self.model(batch.to(self._device)).logits.float(), dim=-1).cpu()
            for row, (i, (first, continuation)) in enumerate(zip(chunk, spans)):
                scores = logprobs[row, first:first + len(continuation)]  # (len(continuation), vocab)
                target = torch.tensor(continuation)
                result = (scores.gather(1, target[:, None]).sum().item(), bool((scores.argmax(-1) == target).all()))
                results[i] = result
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text, scored in windows of the model's context."""
        totals = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows],
                                                disable_tqdm=True)
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, eos, or max_gen_toks tokens (greedy unless do_sample)."""
        engine = Engine(self.model, self.tokenizer, max_batch=self.batch_size, max_context=self.max_length)
        batch, outputs = [], []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            batch.append(request)
            if len(batch) == self.batch_size or request is requests[-1]:
                outputs += self._generate_batch(engine, batch)
                batch = []
        return outputs

    def _generate_batch(self, engine: Engine, requests) -> list[str]:
        plans = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            until = options.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
            params = SamplingParams(max_tokens=max_new, temperature=temperature,
                                    top_p=options.get("top_p") or 1.0, top_k=options.get("top_k") or 0,
                                    stop=tuple(s for s in until if s), seed=options.get("seed")).validate()
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
            plans.append((until, GenerationRequest(prompt, params, stop_ids=frozenset({self.eot_token_id}))))
        texts = []
        for (until, _), request, completion in zip(plans, requests, engine.complete([r for _, r in plans])):
            # As lm-eval's "hf" model: special tokens are dropped from the text, which ends before any stop string.
            text = self.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), text)
            texts.append(text)
        return texts


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the "fmforge" model type registered (this module was imported)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
