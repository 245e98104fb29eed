"""Old (every stop string searched in the whole text at every token, as on main before issue 22) vs new (one
Aho-Corasick automaton fed the new characters) stop-string matching, per generated token, with SmolLM2's
tokenizer: 64 stop strings of 256 characters (the new limit) and the issue's 150,000 short ones (the old server
took them; the new one refuses more than 64), over 256 generated tokens; arms interleaved, one thread."""
import random
import statistics
import time

from transformers import AutoTokenizer

from service.text import StopMatcher, TextAssembler
from shortcuts.assets import default_model_dir

tok = AutoTokenizer.from_pretrained(default_model_dir())
rng = random.Random(0)
TEXT = "The city of Paris is the capital of France and a centre of art, fashion and science. "
ids = tok(TEXT * 12)["input_ids"][:256]

class Old:
    def __init__(self, stops):
        self.stops, self.ids = stops, []
    def add(self, t):
        self.ids.append(t)
        text = tok.decode(self.ids, skip_special_tokens=True)
        return min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)

def per_token(make):
    a = make()
    t0 = time.perf_counter()
    for t in ids:
        a.add(t)
    return (time.perf_counter() - t0) / len(ids)


def random_stops(n: int, length: int) -> list[str]:
    return ["".join(rng.choice("abcdefgh ") for _ in range(length)) for _ in range(n)]


for name, stops in (("64 x 256 chars", random_stops(64, 256)), ("150,000 x 12 chars", random_stops(150_000, 12))):
    t0 = time.perf_counter()
    matcher = StopMatcher(stops)
    build = time.perf_counter() - t0
    olds, news = [], []
    for _ in range(3):
        olds.append(per_token(lambda stops=stops: Old(stops)))
        news.append(per_token(lambda matcher=matcher: TextAssembler(tok, matcher)))
    mo, mn = statistics.median(olds), statistics.median(news)
    print(f"{name}: old {mo*1e3:.3f} ms/token, new {mn*1e3:.3f} ms/token (automaton built once in {build*1e3:.0f} ms), "
          f"ratio old/new {mo/mn:.1f}x")
