"""Where a serving-engine decode step spends its time: cProfile of the engine loop, run synchronously, for batches of
16 (seeded sampling with a logit bias, unseeded sampling, greedy) and 1 (greedy, no speculation).

    .venv/bin/python benchmarks/engine_profile.py      # CPU here; `python3 benchmarks/engine_profile.py` on a GPU

A random `small` model (6 x 256, context 512) and a 2,048-token tokenizer trained on two stdlib modules; 60 steps
after a 10-step warm-up. On the H200 this found cuDNN attention planning a new kernel for every new key span.
"""
import cProfile, pstats, sys, time, io, sysconfig
from pathlib import Path
import torch
sys.path.insert(0, ".")
from fmforge.config import model_config_from_preset
from fmforge.model import Transformer
from fmforge.tokenizer import train_tokenizer
from fmforge.serve.engine import Engine, SamplingOptions
dev = "cuda" if torch.cuda.is_available() else "cpu"
stdlib = Path(sysconfig.get_paths()["stdlib"])
tok = train_tokenizer([(stdlib / n).read_text() for n in ("textwrap.py", "difflib.py")], 2048)
torch.manual_seed(0)
model = Transformer(model_config_from_preset("small", vocab_size=tok.vocab_size, context_length=512)).to(dev).eval()
if dev == "cuda": model.to(torch.bfloat16)
torch.set_grad_enabled(False)
prompt = tok.encode("def parse_args(argv):\n", add_bos=True)
def run_sync(engine, n, B, **opts):
    for _ in range(B):
        engine.submit(prompt, SamplingOptions(max_tokens=n, **opts), lambda event: None)
    engine._waiting, admitted = [], engine._waiting
    for s in admitted: engine._prefill(s)
    while engine._running:
        engine._decode(); engine._retire()
for label, B, opts in [("B16 seeded t0.8 bias", 16, dict(temperature=0.8, seed=1, logit_bias={1: -100.0})),
                       ("B16 unseeded t0.8", 16, dict(temperature=0.8)),
                       ("B16 greedy", 16, dict(temperature=0)),
                       ("B1 greedy nospec", 1, dict(temperature=0))]:
    engine = Engine(model, tok, max_batch=16, speculate=0)
    run_sync(engine, 10, B, **opts)
    if dev == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    pr = cProfile.Profile(); pr.enable()
    run_sync(engine, 60, B, **opts)
    if dev == "cuda": torch.cuda.synchronize()
    pr.disable()
    dt = time.perf_counter() - t
    print(f"\n### {label}: {B*60/dt:.0f} tok/s, {dt/60*1000:.1f} ms/step", flush=True)
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14); print(s.getvalue()[-3500:], flush=True)
